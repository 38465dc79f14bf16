//! The invalidation log: every change `(oid, tid)` from `log_start` up to
//! the horizon `H`, used to check stores (invariant 3) and kept contiguous
//! (invariant 4).

use crate::error::CoreError;
use crate::revision::{Oid, Tid};
use crate::sync::{lock, Mutex, MutexGuard};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Most oids kept as the witness of the horizon transaction (see
/// [`InvalidationLog::witness`]).
pub const WITNESS_OIDS: usize = 4;

/// A contiguous record of changes in the tid interval `(log_start, horizon]`.
///
/// Exact reports are the shape ZEO's `invalidateTransaction` and a commit's
/// `tpc_finish` give: `(from, to, [(oid, tid)])`, every change in
/// `(from, to]` with its exact tid ([`InvalidationLog::apply`]). Collapsed
/// reports (ZEO's reconnect and `getInvalidations`, RelStorage's poll, a
/// summarised catch-up) list every oid changed in `(from, to]` with its
/// newest change or an upper bound of it
/// ([`InvalidationLog::apply_collapsed`]): the log then holds, per oid,
/// *uncertain intervals* `(a, T]` (the oid's first change after `a` lies in
/// `(a, T]`, or nowhere) beside the exact tids.
#[derive(Debug, Clone)]
pub struct InvalidationLog {
    log_start: Tid,
    horizon: Tid,
    by_oid: HashMap<Oid, BTreeSet<Tid>>,
    by_tid: BTreeMap<Tid, Vec<Oid>>,
    /// Uncertain intervals `(a, T]` per oid, as `a -> T` (the widest `T`
    /// for one `a`).
    uncertain: HashMap<Oid, BTreeMap<Tid, Tid>>,
    /// The same intervals by their `T`, for truncation: `T -> [(oid, a)]`.
    uncertain_by_end: BTreeMap<Tid, Vec<(Oid, Tid)>>,
    witness: Vec<Oid>,
}

/// What the log says of an oid after a view `V` (an open store's check,
/// invariant 3): see [`InvalidationLog::after_view`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterView {
    /// No change of the oid in `(V, horizon]`.
    Unchanged,
    /// The revision current at `V` is provably valid up to (excluding)
    /// this tid, and nothing is known after it: an exact change, or the
    /// start `a + 1` of an uncertain interval `(a, T]` with `V < a`.
    ValidUntil(Tid),
    /// An uncertain interval `(a, T]` with `a <= V < T`: the oid may have
    /// changed right after `V`.
    Uncertain,
}

/// A collapsed report applied to an [`InvalidationLog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollapsedApplied {
    /// The horizon before the report (`H0`): the log was exact up to it.
    pub prior: Tid,
    /// The horizon after the report.
    pub horizon: Tid,
    /// The report's oids whose newest change `T` lies past `prior`, with
    /// `T` (one entry per oid, the largest `T`), in oid order: only these
    /// close or drop cached revisions.
    pub uncertain: Vec<(Oid, Tid)>,
}

impl InvalidationLog {
    /// A log complete from (and horizon at) `start`: no change is known, and
    /// none is needed, for the empty interval `(start, start]`.
    pub fn starting_at(start: Tid) -> Self {
        InvalidationLog {
            log_start: start,
            horizon: start,
            by_oid: HashMap::new(),
            by_tid: BTreeMap::new(),
            uncertain: HashMap::new(),
            uncertain_by_end: BTreeMap::new(),
            witness: Vec::new(),
        }
    }

    /// Up to [`WITNESS_OIDS`] oids changed at exactly the horizon's tid, the
    /// smallest first: known when the horizon came from a report whose
    /// changes include its `to` (an exact report lists every change at
    /// `to`). Empty when the horizon came from a start (attach, resync, a
    /// reopened arena) or a report with no change at `to`. A client proves
    /// its storage holds the horizon transaction with them (invariant 7:
    /// `loadBefore(oid, horizon + 1)` must return serial `horizon`). Kept
    /// apart from the changes, so truncation never loses it.
    pub fn witness(&self) -> &[Oid] {
        &self.witness
    }

    /// The newest tid up to which invalidation information is complete.
    pub fn horizon(&self) -> Tid {
        self.horizon
    }

    /// The oldest tid from which the log is complete: a store loaded at a
    /// view below it cannot be checked.
    pub fn log_start(&self) -> Tid {
        self.log_start
    }

    /// Number of `(oid, tid)` changes plus uncertain intervals held.
    pub fn len(&self) -> usize {
        self.by_tid.values().map(Vec::len).sum::<usize>() + self.uncertain_by_end.values().map(Vec::len).sum::<usize>()
    }

    /// Whether the log holds no change and no uncertain interval.
    pub fn is_empty(&self) -> bool {
        self.by_tid.is_empty() && self.uncertain_by_end.is_empty()
    }

    /// Applies the report `(from, to, changes)` and returns the new horizon.
    ///
    /// Applied only when `from <= horizon`; then `horizon = max(horizon, to)`.
    /// A report that overlaps what the log holds is applied idempotently.
    ///
    /// # Errors
    /// [`CoreError::Gap`] when `from > horizon` (invariant 4: the cache must
    /// not guess); [`CoreError::BadReport`] when `to < from` or a change's
    /// tid lies outside `(from, to]`.
    pub fn apply(&mut self, from: Tid, to: Tid, changes: &[(Oid, Tid)]) -> Result<Tid, CoreError> {
        Self::check(from, to, changes)?;
        if from > self.horizon {
            return Err(CoreError::Gap {
                from,
                horizon: self.horizon,
            });
        }
        for &(oid, tid) in changes {
            if tid <= self.log_start {
                continue; // below the log: truncated already, nobody needs it
            }
            if self.by_oid.entry(oid).or_default().insert(tid) {
                self.by_tid.entry(tid).or_default().push(oid);
            }
        }
        if to > self.horizon || (to == self.horizon && self.witness.is_empty()) {
            let mut at_to: Vec<Oid> = changes.iter().filter(|&&(_, t)| t == to).map(|&(o, _)| o).collect();
            at_to.sort_unstable();
            at_to.dedup();
            at_to.truncate(WITNESS_OIDS);
            if to > self.horizon || !at_to.is_empty() {
                self.witness = at_to;
            }
        }
        self.horizon = self.horizon.max(to);
        Ok(self.horizon)
    }

    /// Applies the collapsed report `(from, to, changes)`: every oid changed
    /// in `(from, to]` is listed once or more, with a tid `T` (`from < T <=
    /// to`) at or after its newest change in the interval (the exact newest,
    /// or an upper bound such as `to`). Returns what the caches must close.
    ///
    /// Contiguity as [`InvalidationLog::apply`]: applied only when `from <=
    /// horizon`, then `horizon = max(horizon, to)`. With `H0` the horizon
    /// before, the log is exact on `(log_start, H0]`, so only `(H0, to]` is
    /// uncertain: a listed oid with `T > H0` gets the uncertain interval
    /// `(H0, T]` (its first change after `H0` is in there, or nowhere); one
    /// with `T <= H0`, or an unlisted oid, did not change in `(H0, to]`.
    /// A report that moves the horizon leaves no witness: its tids may be
    /// upper bounds, and a false witness would fail the next attach's
    /// proof (invariant 7).
    ///
    /// # Errors
    /// [`CoreError::Gap`] when `from > horizon`; [`CoreError::BadReport`]
    /// when `to < from` or a tid lies outside `(from, to]`.
    pub fn apply_collapsed(
        &mut self,
        from: Tid,
        to: Tid,
        changes: &[(Oid, Tid)],
    ) -> Result<CollapsedApplied, CoreError> {
        Self::check(from, to, changes)?;
        if from > self.horizon {
            return Err(CoreError::Gap {
                from,
                horizon: self.horizon,
            });
        }
        let prior = self.horizon;
        let mut newest: BTreeMap<Oid, Tid> = BTreeMap::new();
        for &(oid, t) in changes {
            if t > prior {
                let n = newest.entry(oid).or_insert(t);
                *n = (*n).max(t);
            }
        }
        for (&oid, &t) in &newest {
            let by_start = self.uncertain.entry(oid).or_default();
            match by_start.insert(prior, t) {
                Some(w) if w >= t => {
                    by_start.insert(prior, w);
                    continue;
                }
                Some(w) => {
                    if let Some(v) = self.uncertain_by_end.get_mut(&w) {
                        v.retain(|&e| e != (oid, prior));
                    }
                }
                None => {}
            }
            self.uncertain_by_end.entry(t).or_default().push((oid, prior));
        }
        self.uncertain_by_end.retain(|_, v| !v.is_empty());
        if to > self.horizon {
            self.witness.clear();
            self.horizon = to;
        }
        Ok(CollapsedApplied {
            prior,
            horizon: self.horizon,
            uncertain: newest.into_iter().collect(),
        })
    }

    fn check(from: Tid, to: Tid, changes: &[(Oid, Tid)]) -> Result<(), CoreError> {
        if to < from {
            return Err(CoreError::BadReport {
                from,
                to,
                reason: "the interval ends before it starts",
            });
        }
        if changes.iter().any(|&(_, t)| t <= from || t > to) {
            return Err(CoreError::BadReport {
                from,
                to,
                reason: "a change's tid lies outside (from, to]",
            });
        }
        Ok(())
    }

    /// What the log says of `oid` after `view` (invariant 3): the first
    /// exact change after `view`, and the uncertain intervals `(a, T]` with
    /// `T > view` (one with `T <= view` says nothing after `view`): one with
    /// `a <= view` makes the store [`AfterView::Uncertain`]; one with
    /// `view < a` bounds the validity at `a + 1` ("closed at the first
    /// change the log can prove"). The earliest bound wins.
    pub fn after_view(&self, oid: Oid, view: Tid) -> AfterView {
        let mut until = self.first_change_after(oid, view);
        if let Some(intervals) = self.uncertain.get(&oid) {
            for (&a, &t) in intervals {
                if t <= view {
                    continue;
                }
                if a <= view {
                    return AfterView::Uncertain;
                }
                let bound = Tid(a.0.saturating_add(1));
                until = Some(until.map_or(bound, |u| u.min(bound)));
            }
        }
        until.map_or(AfterView::Unchanged, AfterView::ValidUntil)
    }

    /// The first change of `oid` with tid in `(after, horizon]`, if any.
    pub fn first_change_after(&self, oid: Oid, after: Tid) -> Option<Tid> {
        use std::ops::Bound::{Excluded, Unbounded};
        self.by_oid
            .get(&oid)?
            .range((Excluded(after), Unbounded))
            .next()
            .copied()
    }

    /// Forgets every change with tid `<= below` (capped at the horizon) and
    /// every uncertain interval `(a, T]` with `T <= below`, and moves
    /// `log_start` up to it (invariant 5: the log may be truncated below the
    /// low-water mark).
    pub fn truncate(&mut self, below: Tid) {
        let below = below.min(self.horizon);
        if below <= self.log_start {
            return;
        }
        let keep = self.by_tid.split_off(&Tid(below.0.saturating_add(1)));
        for (tid, oids) in std::mem::replace(&mut self.by_tid, keep) {
            for oid in oids {
                if let Some(set) = self.by_oid.get_mut(&oid) {
                    set.remove(&tid);
                    if set.is_empty() {
                        self.by_oid.remove(&oid);
                    }
                }
            }
        }
        let keep = self.uncertain_by_end.split_off(&Tid(below.0.saturating_add(1)));
        for (t, intervals) in std::mem::replace(&mut self.uncertain_by_end, keep) {
            for (oid, a) in intervals {
                if let Some(by_start) = self.uncertain.get_mut(&oid) {
                    if by_start.get(&a) == Some(&t) {
                        by_start.remove(&a);
                    }
                    if by_start.is_empty() {
                        self.uncertain.remove(&oid);
                    }
                }
            }
        }
        self.log_start = below;
    }
}

/// A cache's invalidation log behind the lock that serialises its writers
/// (`None` until the log starts). Both caches (`SnapshotCache`, the arena's
/// `ArenaCache`) hold one, so the order a report is applied in is written
/// once: see [`LogLock::apply`].
pub(crate) struct LogLock(Mutex<Option<InvalidationLog>>);

/// A report applied by [`LogLock::apply`]: the log stays locked until this
/// is dropped.
pub(crate) struct Applied<'a> {
    _guard: MutexGuard<'a, Option<InvalidationLog>>,
    /// The horizon after the report.
    pub(crate) horizon: Tid,
    /// The report's changes in `(tid, oid)` order.
    pub(crate) changes: Vec<(Oid, Tid)>,
}

impl LogLock {
    /// A lock holding `log`.
    pub(crate) fn new(log: Option<InvalidationLog>) -> Self {
        LogLock(Mutex::new(log))
    }

    /// The log, locked.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Option<InvalidationLog>> {
        lock(&self.0)
    }

    /// Applies a report (invariant 4) and keeps the log locked: the caller
    /// closes the revisions each change ends, in the order given, and only
    /// then publishes the horizon, before dropping the [`Applied`] (so
    /// reports publish their horizons in order).
    ///
    /// # Errors
    /// [`CoreError::Gap`] (also before the log started),
    /// [`CoreError::BadReport`].
    pub(crate) fn apply(&self, from: Tid, to: Tid, changes: &[(Oid, Tid)]) -> Result<Applied<'_>, CoreError> {
        let mut guard = self.lock();
        let log = guard.as_mut().ok_or(CoreError::Gap {
            from,
            horizon: Tid::ZERO,
        })?;
        let horizon = log.apply(from, to, changes)?;
        let mut changes = changes.to_vec();
        changes.sort_by_key(|&(oid, tid)| (tid, oid));
        Ok(Applied {
            _guard: guard,
            horizon,
            changes,
        })
    }

    /// Applies a collapsed report ([`InvalidationLog::apply_collapsed`]) and
    /// keeps the log locked, in the order of [`LogLock::apply`]: the caller
    /// closes or drops the revisions of [`CollapsedApplied::uncertain`] and
    /// only then publishes the horizon, before dropping the guard.
    ///
    /// # Errors
    /// [`CoreError::Gap`] (also before the log started),
    /// [`CoreError::BadReport`].
    pub(crate) fn apply_collapsed(
        &self,
        from: Tid,
        to: Tid,
        changes: &[(Oid, Tid)],
    ) -> Result<(MutexGuard<'_, Option<InvalidationLog>>, CollapsedApplied), CoreError> {
        let mut guard = self.lock();
        let log = guard.as_mut().ok_or(CoreError::Gap {
            from,
            horizon: Tid::ZERO,
        })?;
        let applied = log.apply_collapsed(from, to, changes)?;
        Ok((guard, applied))
    }

    /// Truncates the log below `low_water` (at most the horizon) and keeps
    /// it locked; returns the low-water mark used, `None` before the log
    /// started.
    pub(crate) fn truncate(&self, low_water: Tid) -> (MutexGuard<'_, Option<InvalidationLog>>, Option<Tid>) {
        let mut guard = self.lock();
        let low = guard.as_mut().map(|l| {
            let low = low_water.min(l.horizon());
            l.truncate(low);
            low
        });
        (guard, low)
    }

    /// The horizon, `None` before the log started.
    pub(crate) fn horizon(&self) -> Option<Tid> {
        self.lock().as_ref().map(InvalidationLog::horizon)
    }

    /// The horizon and its witness oids (see [`InvalidationLog::witness`]),
    /// read together; `None` before the log started.
    pub(crate) fn witness(&self) -> Option<(Tid, Vec<Oid>)> {
        self.lock().as_ref().map(|l| (l.horizon(), l.witness().to_vec()))
    }

    /// The log's start, `None` before the log started.
    pub(crate) fn log_start(&self) -> Option<Tid> {
        self.lock().as_ref().map(InvalidationLog::log_start)
    }

    /// Changes held in the log.
    pub(crate) fn len(&self) -> usize {
        self.lock().as_ref().map_or(0, InvalidationLog::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> InvalidationLog {
        InvalidationLog::starting_at(Tid(10))
    }

    #[test]
    fn contiguous_reports_advance_the_horizon() {
        let mut l = log();
        assert_eq!(l.apply(Tid(10), Tid(12), &[(Oid(1), Tid(12))]), Ok(Tid(12)));
        assert_eq!(
            l.apply(Tid(11), Tid(15), &[(Oid(1), Tid(12)), (Oid(2), Tid(14))]),
            Ok(Tid(15))
        );
        assert_eq!(l.first_change_after(Oid(1), Tid(10)), Some(Tid(12)));
        assert_eq!(l.first_change_after(Oid(1), Tid(12)), None);
        assert_eq!(l.len(), 2, "a change reported twice is held once");
    }

    #[test]
    fn a_gap_is_refused_and_changes_nothing() {
        let mut l = log();
        assert_eq!(
            l.apply(Tid(11), Tid(13), &[(Oid(1), Tid(13))]),
            Err(CoreError::Gap {
                from: Tid(11),
                horizon: Tid(10)
            })
        );
        assert_eq!(l.horizon(), Tid(10));
        assert_eq!(l.first_change_after(Oid(1), Tid(10)), None);
    }

    #[test]
    fn an_overlapping_old_report_never_moves_the_horizon_back() {
        let mut l = log();
        l.apply(Tid(10), Tid(20), &[(Oid(1), Tid(15))]).unwrap();
        assert_eq!(l.apply(Tid(12), Tid(18), &[(Oid(1), Tid(15))]), Ok(Tid(20)));
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn changes_outside_the_interval_are_refused() {
        let mut l = log();
        assert!(matches!(
            l.apply(Tid(10), Tid(12), &[(Oid(1), Tid(13))]),
            Err(CoreError::BadReport { .. })
        ));
        assert!(matches!(
            l.apply(Tid(10), Tid(12), &[(Oid(1), Tid(10))]),
            Err(CoreError::BadReport { .. })
        ));
        assert!(matches!(
            l.apply(Tid(12), Tid(11), &[]),
            Err(CoreError::BadReport { .. })
        ));
    }

    #[test]
    fn the_witness_names_oids_changed_at_the_horizon() {
        let mut l = log();
        assert!(l.witness().is_empty(), "a started log knows no transaction");
        let changes: Vec<(Oid, Tid)> = (1..=6)
            .rev()
            .map(|o| (Oid(o), Tid(12)))
            .chain([(Oid(9), Tid(11))])
            .collect();
        l.apply(Tid(10), Tid(12), &changes).unwrap();
        assert_eq!(l.witness(), &[Oid(1), Oid(2), Oid(3), Oid(4)]);
        l.truncate(Tid(12));
        assert_eq!(l.witness(), &[Oid(1), Oid(2), Oid(3), Oid(4)], "truncation keeps it");
        // An old overlapping report leaves it; a report to a new horizon
        // without a change at its `to` empties it.
        l.apply(Tid(10), Tid(12), &[(Oid(7), Tid(11))]).unwrap();
        assert_eq!(l.witness().len(), 4);
        l.apply(Tid(12), Tid(14), &[(Oid(8), Tid(13))]).unwrap();
        assert!(l.witness().is_empty());
        l.apply(Tid(14), Tid(14), &[]).unwrap();
        assert!(l.witness().is_empty());
        l.apply(Tid(14), Tid(15), &[(Oid(8), Tid(15))]).unwrap();
        assert_eq!(l.witness(), &[Oid(8)]);
    }

    #[test]
    fn truncation_moves_the_log_start() {
        let mut l = log();
        l.apply(
            Tid(10),
            Tid(20),
            &[(Oid(1), Tid(12)), (Oid(1), Tid(18)), (Oid(2), Tid(15))],
        )
        .unwrap();
        l.truncate(Tid(15));
        assert_eq!(l.log_start(), Tid(15));
        assert_eq!(l.first_change_after(Oid(1), Tid(10)), Some(Tid(18)));
        assert_eq!(l.first_change_after(Oid(2), Tid(10)), None);
        l.truncate(Tid(99));
        assert_eq!(l.log_start(), Tid(20), "never past the horizon");
        assert!(l.is_empty());
    }

    /// A collapsed report: only `(H0, to]` is uncertain; a listed oid with
    /// `T > H0` gets `(H0, T]`, one with `T <= H0` nothing; stores check it.
    #[test]
    fn a_collapsed_report_keeps_uncertain_intervals_past_the_prior_horizon() {
        let mut l = log();
        l.apply(Tid(10), Tid(12), &[(Oid(1), Tid(12))]).unwrap();
        let applied = l
            .apply_collapsed(
                Tid(11),
                Tid(20),
                &[(Oid(1), Tid(12)), (Oid(2), Tid(20)), (Oid(2), Tid(15))],
            )
            .unwrap();
        assert_eq!(
            applied,
            CollapsedApplied {
                prior: Tid(12),
                horizon: Tid(20),
                uncertain: vec![(Oid(2), Tid(20))],
            }
        );
        // Oid 1's newest change is 12, known exactly: nothing after 12.
        assert_eq!(l.after_view(Oid(1), Tid(12)), AfterView::Unchanged);
        assert_eq!(l.after_view(Oid(1), Tid(11)), AfterView::ValidUntil(Tid(12)));
        // Oid 2 changed in (12, 20]: before 12 it is valid up to 13, in
        // [12, 20) it is uncertain, from 20 on unchanged.
        assert_eq!(l.after_view(Oid(2), Tid(11)), AfterView::ValidUntil(Tid(13)));
        assert_eq!(l.after_view(Oid(2), Tid(12)), AfterView::Uncertain);
        assert_eq!(l.after_view(Oid(2), Tid(19)), AfterView::Uncertain);
        assert_eq!(l.after_view(Oid(2), Tid(20)), AfterView::Unchanged);
        assert_eq!(l.after_view(Oid(3), Tid(11)), AfterView::Unchanged);
        assert_eq!(l.len(), 2);
        // An exact change earlier than the interval's start wins.
        l.apply(Tid(20), Tid(25), &[(Oid(2), Tid(22))]).unwrap();
        l.apply_collapsed(Tid(25), Tid(30), &[(Oid(2), Tid(28))]).unwrap();
        assert_eq!(l.after_view(Oid(2), Tid(21)), AfterView::ValidUntil(Tid(22)));
        assert_eq!(l.after_view(Oid(2), Tid(23)), AfterView::ValidUntil(Tid(26)));
        assert_eq!(l.after_view(Oid(2), Tid(27)), AfterView::Uncertain);
        // Refusals as for exact reports, changing nothing.
        assert_eq!(
            l.apply_collapsed(Tid(31), Tid(40), &[]),
            Err(CoreError::Gap {
                from: Tid(31),
                horizon: Tid(30)
            })
        );
        assert!(matches!(
            l.apply_collapsed(Tid(30), Tid(35), &[(Oid(1), Tid(36))]),
            Err(CoreError::BadReport { .. })
        ));
        assert_eq!(l.horizon(), Tid(30));
    }

    /// Truncation drops intervals `(a, T]` with `T <= below` only.
    #[test]
    fn truncation_drops_uncertain_intervals_that_end_below_it() {
        let mut l = log();
        l.apply_collapsed(Tid(10), Tid(20), &[(Oid(1), Tid(15)), (Oid(2), Tid(20))])
            .unwrap();
        l.truncate(Tid(15));
        assert_eq!(l.len(), 1);
        assert_eq!(l.after_view(Oid(1), Tid(15)), AfterView::Unchanged);
        assert_eq!(l.after_view(Oid(2), Tid(15)), AfterView::Uncertain);
        l.truncate(Tid(20));
        assert!(l.is_empty());
        assert_eq!(l.after_view(Oid(2), Tid(20)), AfterView::Unchanged);
    }

    /// A collapsed report's tids may be upper bounds: one that moves the
    /// horizon leaves no witness (a false one would fail the next proof);
    /// one that does not leaves the witness as it was.
    #[test]
    fn a_collapsed_report_leaves_no_witness() {
        let mut l = log();
        l.apply(Tid(10), Tid(12), &[(Oid(1), Tid(12))]).unwrap();
        assert_eq!(l.witness(), &[Oid(1)]);
        l.apply_collapsed(Tid(10), Tid(12), &[(Oid(1), Tid(12))]).unwrap();
        assert_eq!(l.witness(), &[Oid(1)], "the horizon did not move");
        l.apply_collapsed(Tid(12), Tid(14), &[(Oid(2), Tid(14))]).unwrap();
        assert!(l.witness().is_empty());
    }
}
