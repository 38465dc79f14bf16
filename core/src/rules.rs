//! The MVCC rules every cache applies, in one place: how a store is
//! checked against the invalidation log (invariant 3), what a reported
//! change does to a cached revision, and the outcomes and counters both
//! caches report. [`crate::SnapshotCache`] (in-process) and
//! [`crate::arena::ArenaCache`] (the sidecar's shared-memory arena) call
//! these functions; neither has rules of its own.

use crate::error::CoreError;
use crate::invalidation::{AfterView, InvalidationLog};
use crate::revision::{Oid, Tid};

/// `end` of an open (current) revision in both caches' words.
pub(crate) const OPEN: u64 = u64::MAX;

/// Why a store was not kept. Refusals are normal (a miss is always safe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No log yet (no client attached): an open store cannot be checked.
    LogNotStarted,
    /// The store was loaded at a view below `log_start` (invariant 3).
    BeforeLogStart,
    /// A newer revision of the oid is cached, so "current" is stale.
    Superseded,
    /// The cache cannot hold it: a state larger than a segment, an oid over
    /// 48 bits, or a database without a slot (arena only).
    NotCacheable,
    /// Its serial is past the horizon: a transaction no report has told of
    /// yet (a lost report, a catch-up under way), so
    /// nothing says it belongs to the history the database holds; a
    /// history restored later that holds the horizon would be served it
    /// (invariant 7). It can be stored again once reported.
    PastHorizon,
    /// A collapsed report left the oid's first change after some `a` only
    /// bounded, in `(a, T]`, and the store was loaded at a view in `[a, T)`:
    /// the revision may have ended right after its view (invariant 3).
    Uncertain,
    /// A closed revision whose end is at or below the database's low-water
    /// mark: no registered view can see it (invariant 5), and keeping it
    /// would only lengthen its oid's chain (arena only).
    Invisible,
}

/// What a store did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Kept as the current (open) revision.
    Open,
    /// Kept with a known end: given by the caller, or found in the log.
    Closed(Tid),
    /// Not kept.
    Refused(Refusal),
}

/// Counters and sizes of a cache, for `tidecached stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Revisions indexed.
    pub entries: u64,
    /// State bytes plus [`ENTRY_OVERHEAD`] per revision.
    pub bytes: u64,
    /// Size bound, bytes (shared with the other caches of its budget).
    pub capacity: u64,
    /// Lookups answered.
    pub hits: u64,
    /// Lookups not answered.
    pub misses: u64,
    /// Stores kept (open or closed).
    pub stores: u64,
    /// Stores refused.
    pub refused: u64,
    /// `(oid, tid)` changes received in applied reports.
    pub invalidations: u64,
    /// Revisions reclaimed because no registered view can see them.
    pub reclaimed: u64,
    /// Revisions evicted by the size bound.
    pub evicted: u64,
}

/// What a store becomes, decided against the log (invariant 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StorePlan {
    /// Insert with this end ([`OPEN`] for an open revision).
    Insert(u64),
    /// Refuse.
    Refuse(Refusal),
}

/// The rule every cache applies to a store of `(oid, serial)` loaded at
/// `view` with `end` (`None`: current at `view`): a closed store needs its
/// serial at or below the log's horizon (if there is a log); an open one
/// needs a log that covers `view`, its serial at or below the horizon, no
/// later serial of the oid cached (`has_later`), and is closed at the
/// log's first change of the oid after `view`, if any: the first change the
/// log can prove, an uncertain interval `(a, T]` of a collapsed report
/// with `view < a` closing it at `a + 1`, one with `a <= view < T` refusing
/// it ([`Refusal::Uncertain`]; see [`InvalidationLog::after_view`]). A serial past the
/// horizon is a transaction no report told of: a history that holds the
/// horizon but not that transaction (a backup restored) could be served
/// it, and its own reports would not correct it.
///
/// # Errors
/// [`CoreError::BadStore`] for an end not after the serial or a view older
/// than the serial.
pub(crate) fn plan_store(
    log: Option<&InvalidationLog>,
    oid: Oid,
    serial: Tid,
    end: Option<Tid>,
    view: Tid,
    has_later: impl FnOnce() -> bool,
) -> Result<StorePlan, CoreError> {
    match end {
        Some(e) if e <= serial => Err(CoreError::BadStore {
            oid,
            serial,
            reason: "end is not after serial",
        }),
        Some(e) => Ok(match log {
            Some(l) if serial > l.horizon() => StorePlan::Refuse(Refusal::PastHorizon),
            _ => StorePlan::Insert(e.0),
        }),
        None if view < serial => Err(CoreError::BadStore {
            oid,
            serial,
            reason: "current at a view older than its serial",
        }),
        None => Ok(match log {
            None => StorePlan::Refuse(Refusal::LogNotStarted),
            Some(l) if view < l.log_start() => StorePlan::Refuse(Refusal::BeforeLogStart),
            Some(l) if serial > l.horizon() => StorePlan::Refuse(Refusal::PastHorizon),
            Some(_) if has_later() => StorePlan::Refuse(Refusal::Superseded),
            Some(l) => match l.after_view(oid, view) {
                AfterView::Unchanged => StorePlan::Insert(OPEN),
                AfterView::ValidUntil(t) => StorePlan::Insert(t.0),
                AfterView::Uncertain => StorePlan::Refuse(Refusal::Uncertain),
            },
        }),
    }
}

/// What a reported change at `tid` does to the newest cached revision of
/// its oid with a serial before `tid`, whose end is `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closing {
    /// It was open: it ends at `tid`.
    Close,
    /// It is known to end after `tid`, which contradicts the report: trust
    /// neither, drop the revision.
    Drop,
    /// It already ends at or before `tid`.
    Keep,
}

/// See [`Closing`].
pub(crate) fn closing(end: u64, tid: Tid) -> Closing {
    if end == OPEN {
        Closing::Close
    } else if end > tid.0 {
        Closing::Drop
    } else {
        Closing::Keep
    }
}

/// What a collapsed report that left `oid`'s first change after `prior`
/// (the horizon before it) somewhere in `(prior, newest]` does to a cached
/// revision `[serial, end)` of `oid` (`end` [`OPEN`] while open).
///
/// - `end <= prior`: history before the uncertain part: [`Closing::Keep`].
/// - `serial > prior`: a revision past the horizon it was stored under
///   (stores past the horizon are refused): [`Closing::Drop`].
/// - open (`serial <= prior`): valid up to `prior`, since the log was exact
///   there: [`Closing::Close`] at `prior + 1` (it then answers views
///   `<= prior` only, which is true).
/// - closed with `prior < end <= newest`: its end may be the change the
///   report summarises: [`Closing::Keep`].
/// - closed with `end > newest`: it claims no change in `(prior, newest]`,
///   which an exact `newest` contradicts, and the cache cannot tell an
///   exact `newest` from an upper bound: trust neither, [`Closing::Drop`]
///   (as [`closing`] does for an exact report).
pub(crate) fn collapsing(serial: u64, end: u64, prior: Tid, newest: Tid) -> Closing {
    if end <= prior.0 {
        Closing::Keep
    } else if serial > prior.0 || end > newest.0 && end != OPEN || prior.0.saturating_add(1) == OPEN {
        Closing::Drop
    } else if end == OPEN {
        Closing::Close
    } else {
        Closing::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A revision whose serial is past the horizon is a transaction no
    /// report told of: it may be another history's (a lost report, then a
    /// backup restored that holds the horizon), so it is never kept, open
    /// or closed; at or below the horizon both are kept as before.
    #[test]
    fn a_store_past_the_horizon_is_refused() {
        let log = InvalidationLog::starting_at(Tid(10));
        let plan = |serial, end: Option<u64>, view| {
            plan_store(Some(&log), Oid(1), Tid(serial), end.map(Tid), Tid(view), || false).unwrap()
        };
        assert_eq!(plan(20, None, 20), StorePlan::Refuse(Refusal::PastHorizon));
        assert_eq!(plan(20, Some(25), 30), StorePlan::Refuse(Refusal::PastHorizon));
        assert_eq!(plan(10, None, 20), StorePlan::Insert(OPEN));
        assert_eq!(plan(5, Some(12), 20), StorePlan::Insert(12));
        // Without a log, closed stores are kept as before.
        let closed = plan_store(None, Oid(1), Tid(20), Some(Tid(25)), Tid(30), || false).unwrap();
        assert_eq!(closed, StorePlan::Insert(25));
    }

    /// What a collapsed report whose oid changed in `(20, 30]` does to
    /// each kind of cached revision (prior horizon 20, newest 30).
    #[test]
    fn a_collapsed_report_closes_the_open_revision_at_the_prior_horizon() {
        let c = |serial, end| collapsing(serial, end, Tid(20), Tid(30));
        assert_eq!(c(5, OPEN), Closing::Close, "answers views <= 20 only");
        assert_eq!(c(5, 15), Closing::Keep, "history before the uncertain part");
        assert_eq!(c(5, 20), Closing::Keep);
        assert_eq!(c(5, 25), Closing::Keep, "its end may be the change summarised");
        assert_eq!(c(5, 30), Closing::Keep);
        assert_eq!(c(5, 31), Closing::Drop, "claims no change in (20, 30]");
        assert_eq!(c(22, OPEN), Closing::Drop, "past the prior horizon");
    }

    /// An open store loaded inside an uncertain interval is refused; one
    /// loaded before it is closed at its start + 1; one after it is open.
    #[test]
    fn an_open_store_in_an_uncertain_interval_is_refused() {
        let mut log = InvalidationLog::starting_at(Tid(6));
        log.apply(Tid(6), Tid(10), &[]).unwrap();
        log.apply_collapsed(Tid(10), Tid(20), &[(Oid(1), Tid(18))]).unwrap();
        let plan = |view| plan_store(Some(&log), Oid(1), Tid(5), None, Tid(view), || false).unwrap();
        assert_eq!(plan(9), StorePlan::Insert(11));
        assert_eq!(plan(10), StorePlan::Refuse(Refusal::Uncertain));
        assert_eq!(plan(12), StorePlan::Refuse(Refusal::Uncertain));
        assert_eq!(plan(18), StorePlan::Insert(OPEN));
        // A closed store is history: kept as is.
        let closed = plan_store(Some(&log), Oid(1), Tid(5), Some(Tid(15)), Tid(12), || false).unwrap();
        assert_eq!(closed, StorePlan::Insert(15));
    }
}
