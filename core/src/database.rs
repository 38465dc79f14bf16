//! One ZODB database as the cache sees it: its snapshot cache, its views and
//! the attach / resync rules that keep time from running backwards
//! (invariant 7).

use crate::error::CoreError;
#[cfg(feature = "snapshot")]
use crate::eviction::SizeBound;
#[cfg(feature = "snapshot")]
use crate::revision::StateWeight;
use crate::revision::{Oid, Tid};
use crate::rules::{CacheStats, StoreOutcome};
#[cfg(feature = "snapshot")]
use crate::snapshot::{Hit, SnapshotCache};
use crate::view::{ViewId, ViewRegistry};
#[cfg(feature = "snapshot")]
use std::sync::Arc;

/// What a [`DatabaseOf`] needs of its cache: the operations of
/// [`SnapshotCache`] (in-process, `Arc`-shared states) and of
/// [`crate::arena::ArenaCache`] (the shared-memory arena), which both apply
/// the same MVCC rules.
pub trait Revisions: Send + Sync {
    /// What a store takes as the state.
    type State;
    /// What a hit hands out.
    type Hit;
    /// The revision of `oid` visible at `view`, if cached.
    fn lookup(&self, oid: Oid, view: Tid) -> Option<Self::Hit>;
    /// Stores a revision loaded at `view` (invariant 3).
    ///
    /// # Errors
    /// [`CoreError::BadStore`].
    fn store(
        &self,
        oid: Oid,
        serial: Tid,
        end: Option<Tid>,
        view: Tid,
        state: Self::State,
    ) -> Result<StoreOutcome, CoreError>;
    /// Applies an invalidation report (invariant 4).
    ///
    /// # Errors
    /// [`CoreError::Gap`], [`CoreError::BadReport`].
    fn report(&self, from: Tid, to: Tid, changes: &[(Oid, Tid)]) -> Result<Tid, CoreError>;
    /// Applies a collapsed report: every oid changed in `(from, to]` with its
    /// newest change or an upper bound of it (invariants 3 and 4, see
    /// [`crate::InvalidationLog::apply_collapsed`]).
    ///
    /// # Errors
    /// [`CoreError::Gap`], [`CoreError::BadReport`].
    fn report_collapsed(&self, from: Tid, to: Tid, changes: &[(Oid, Tid)]) -> Result<Tid, CoreError>;
    /// Drops open revisions and restarts the log at `at`.
    fn start_log(&self, at: Tid);
    /// Drops everything.
    fn flush(&self);
    /// Reclaims what ends at or below `low_water` (invariant 5).
    fn reclaim(&self, low_water: Tid) -> usize;
    /// The horizon, `None` before the log started.
    fn horizon(&self) -> Option<Tid>;
    /// The log's start.
    fn log_start(&self) -> Option<Tid>;
    /// The horizon and the oids changed at exactly it (at most four; see
    /// [`crate::InvalidationLog::witness`]), `None` before the log started.
    fn witness(&self) -> Option<(Tid, Vec<Oid>)>;
    /// `(serial, end)` of the revision of `oid` visible at `view`, if held.
    fn revision_at(&self, oid: Oid, view: Tid) -> Option<(Tid, Option<Tid>)>;
    /// The `limit` open revisions the cache held before this run, `(oid,
    /// serial)`, highest serials first; `None` while that is not known yet
    /// (a reopened arena still being verified).
    fn open_revisions(&self, limit: usize) -> Option<Vec<(Oid, Tid)>>;
    /// Changes in the log.
    fn log_len(&self) -> usize;
    /// Counters and sizes.
    fn stats(&self) -> CacheStats;
}

#[cfg(feature = "snapshot")]
impl<S: StateWeight + Send + Sync + 'static> Revisions for SnapshotCache<S> {
    type State = Arc<S>;
    type Hit = Hit<S>;
    fn lookup(&self, oid: Oid, view: Tid) -> Option<Hit<S>> {
        SnapshotCache::lookup(self, oid, view)
    }
    fn store(
        &self,
        oid: Oid,
        serial: Tid,
        end: Option<Tid>,
        view: Tid,
        state: Arc<S>,
    ) -> Result<StoreOutcome, CoreError> {
        SnapshotCache::store(self, oid, serial, end, view, state)
    }
    fn report(&self, from: Tid, to: Tid, changes: &[(Oid, Tid)]) -> Result<Tid, CoreError> {
        SnapshotCache::report(self, from, to, changes)
    }
    fn report_collapsed(&self, from: Tid, to: Tid, changes: &[(Oid, Tid)]) -> Result<Tid, CoreError> {
        SnapshotCache::report_collapsed(self, from, to, changes)
    }
    fn start_log(&self, at: Tid) {
        SnapshotCache::start_log(self, at);
    }
    fn flush(&self) {
        SnapshotCache::flush(self);
    }
    fn reclaim(&self, low_water: Tid) -> usize {
        SnapshotCache::reclaim(self, low_water)
    }
    fn horizon(&self) -> Option<Tid> {
        SnapshotCache::horizon(self)
    }
    fn log_start(&self) -> Option<Tid> {
        SnapshotCache::log_start(self)
    }
    fn witness(&self) -> Option<(Tid, Vec<Oid>)> {
        SnapshotCache::witness(self)
    }
    fn revision_at(&self, oid: Oid, view: Tid) -> Option<(Tid, Option<Tid>)> {
        SnapshotCache::lookup(self, oid, view).map(|h| (h.serial, h.end))
    }
    fn open_revisions(&self, limit: usize) -> Option<Vec<(Oid, Tid)>> {
        SnapshotCache::open_revisions(self, limit)
    }
    fn log_len(&self) -> usize {
        SnapshotCache::log_len(self)
    }
    fn stats(&self) -> CacheStats {
        SnapshotCache::stats(self)
    }
}

#[cfg(not(loom))]
impl Revisions for crate::arena::ArenaCache {
    type State = Vec<u8>;
    type Hit = crate::arena::Found;
    fn lookup(&self, oid: Oid, view: Tid) -> Option<crate::arena::Found> {
        crate::arena::ArenaCache::lookup(self, oid, view)
    }
    fn store(
        &self,
        oid: Oid,
        serial: Tid,
        end: Option<Tid>,
        view: Tid,
        state: Vec<u8>,
    ) -> Result<StoreOutcome, CoreError> {
        crate::arena::ArenaCache::store(self, oid, serial, end, view, &state)
    }
    fn report(&self, from: Tid, to: Tid, changes: &[(Oid, Tid)]) -> Result<Tid, CoreError> {
        crate::arena::ArenaCache::report(self, from, to, changes)
    }
    fn report_collapsed(&self, from: Tid, to: Tid, changes: &[(Oid, Tid)]) -> Result<Tid, CoreError> {
        crate::arena::ArenaCache::report_collapsed(self, from, to, changes)
    }
    fn start_log(&self, at: Tid) {
        crate::arena::ArenaCache::start_log(self, at);
    }
    fn flush(&self) {
        crate::arena::ArenaCache::flush(self);
    }
    fn reclaim(&self, low_water: Tid) -> usize {
        crate::arena::ArenaCache::reclaim(self, low_water)
    }
    fn horizon(&self) -> Option<Tid> {
        crate::arena::ArenaCache::horizon(self)
    }
    fn log_start(&self) -> Option<Tid> {
        crate::arena::ArenaCache::log_start(self)
    }
    fn witness(&self) -> Option<(Tid, Vec<Oid>)> {
        crate::arena::ArenaCache::witness(self)
    }
    fn revision_at(&self, oid: Oid, view: Tid) -> Option<(Tid, Option<Tid>)> {
        crate::arena::ArenaCache::revision_at(self, oid, view)
    }
    fn open_revisions(&self, limit: usize) -> Option<Vec<(Oid, Tid)>> {
        crate::arena::ArenaCache::open_revisions(self, limit)
    }
    fn log_len(&self) -> usize {
        crate::arena::ArenaCache::log_len(self)
    }
    fn stats(&self) -> CacheStats {
        crate::arena::ArenaCache::stats(self)
    }
}

/// The in-process database: a [`SnapshotCache`] of `Arc<S>` states.
#[cfg(feature = "snapshot")]
pub type Database<S> = DatabaseOf<SnapshotCache<S>>;

/// The sidecar's database: its revisions in the shared-memory arena.
#[cfg(not(loom))]
pub type SharedDatabase = DatabaseOf<crate::arena::ArenaCache>;

/// What attaching a client did to the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachOutcome {
    /// First client (or first after a flush): the log starts at its
    /// `lastTransaction`.
    Started,
    /// The client proved its storage holds the horizon transaction (see
    /// [`Proof`]): joined as is.
    Joined,
    /// The client's `lastTransaction` is below the horizon: either it lags
    /// (another process reported newer commits it has not heard of yet) or
    /// its storage was restored from a backup. Nothing changed; the client
    /// waits for its storage to catch up and attaches again, or, if it does
    /// not, flushes the database (invariant 7) before using it.
    Behind {
        /// The horizon.
        horizon: Tid,
    },
    /// The client's `lastTransaction` is at or past the horizon, but that
    /// alone does not say its history is the one the database holds (a
    /// backup restored and committed to since, another file copied to the
    /// same path): it must prove its storage holds the horizon transaction,
    /// then attach again with `proven = Some(horizon)`; if the proof fails,
    /// it flushes the database and attaches again (invariant 7). Nothing
    /// changed.
    Prove(Proof),
}

/// What a client must prove of its storage before it joins a database
/// ([`AttachOutcome::Prove`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// The horizon `H`: the newest transaction the database knows of.
    pub horizon: Tid,
    /// Oids changed at exactly `H` (at most [`crate::invalidation::WITNESS_OIDS`]): for each,
    /// `loadBefore(oid, H + 1)` must return serial `H`. Empty when unknown:
    /// the storage must then have a transaction with tid `H` (its
    /// iterator).
    pub witness: Vec<Oid>,
    /// Open revisions held, the highest serials (`<= H`) first, at most
    /// [`OPEN_SAMPLE`]: for each `(oid, serial)`, `loadBefore(oid, H + 1)`
    /// must return `serial`.
    pub open_sample: Vec<(Oid, Tid)>,
}

/// Most open revisions a [`Proof`] asks about.
pub const OPEN_SAMPLE: usize = 4;

/// Candidates kept for the open sample: the open revisions stored with the
/// highest serials (some may have been closed or evicted since; they are
/// checked at each attach).
const OPEN_CANDIDATES: usize = 16;

/// A database's cache, views and log.
pub struct DatabaseOf<C> {
    cache: C,
    views: ViewRegistry,
    detached: std::sync::atomic::AtomicU64,
    /// `(serial, oid)` of the open revisions stored with the highest
    /// serials (at most [`OPEN_CANDIDATES`]): where [`Proof::open_sample`]
    /// comes from. Not part of the modelled protocols: a std lock.
    open_candidates: std::sync::Mutex<std::collections::BTreeSet<(Tid, Oid)>>,
    /// Whether the cache held revisions before this run (a reopened arena)
    /// whose open ones have not joined the candidates yet.
    unseeded: std::sync::atomic::AtomicBool,
}

/// Sizes and counters of one database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatabaseStats {
    /// The cache's counters.
    pub cache: CacheStats,
    /// Registered views.
    pub views: u64,
    /// Horizon, `None` before the first attach.
    pub horizon: Option<Tid>,
    /// Oldest registered view.
    pub low_water_mark: Option<Tid>,
    /// Start of the invalidation log.
    pub log_start: Option<Tid>,
    /// Changes held in the log.
    pub log_len: u64,
    /// Views detached for holding the log past its limit.
    pub detached: u64,
}

#[cfg(feature = "snapshot")]
impl<S: StateWeight + Send + Sync + 'static> DatabaseOf<SnapshotCache<S>> {
    /// An empty database with a byte budget of its own.
    pub fn new(capacity_bytes: u64) -> Self {
        Self::within(&SizeBound::new(capacity_bytes))
    }

    /// An empty database sharing the byte budget `bound` with others.
    pub fn within(bound: &SizeBound) -> Self {
        Self::with_cache(SnapshotCache::within(bound))
    }
}

impl<C: Revisions> DatabaseOf<C> {
    /// A database over `cache` (which may already hold revisions: a
    /// reopened arena, whose open revisions with the highest serials join
    /// the attach rule's open sample once the cache knows them, see
    /// [`Revisions::open_revisions`]; until then the sample is empty).
    pub fn with_cache(cache: C) -> Self {
        let unseeded = cache.horizon().is_some();
        DatabaseOf {
            cache,
            views: ViewRegistry::new(),
            detached: Default::default(),
            open_candidates: Default::default(),
            unseeded: std::sync::atomic::AtomicBool::new(unseeded),
        }
    }

    /// The cache.
    pub fn cache(&self) -> &C {
        &self.cache
    }

    /// The view registry.
    pub fn views(&self) -> &ViewRegistry {
        &self.views
    }

    /// A client whose storage's `lastTransaction()` is `last_tid` attaches;
    /// `proven` is the horizon it proved its storage holds (after a
    /// [`AttachOutcome::Prove`]), `None` at first. Invariant 7: a client
    /// joins only with a proof of the current horizon:
    ///
    /// - no log (new or flushed database): the log starts at `last_tid`,
    ///   [`AttachOutcome::Started`];
    /// - `last_tid` below the horizon: [`AttachOutcome::Behind`];
    /// - `proven` is the horizon: [`AttachOutcome::Joined`];
    /// - otherwise (no proof, or one of an older horizon):
    ///   [`AttachOutcome::Prove`] with what to prove.
    ///
    /// Only a database without a log changes.
    pub fn attach(&self, last_tid: Tid, proven: Option<Tid>) -> AttachOutcome {
        let Some((h, witness)) = self.cache.witness() else {
            self.cache.start_log(last_tid);
            self.candidates().clear();
            return AttachOutcome::Started;
        };
        if last_tid < h {
            return AttachOutcome::Behind { horizon: h };
        }
        if proven == Some(h) {
            return AttachOutcome::Joined;
        }
        AttachOutcome::Prove(Proof {
            horizon: h,
            witness,
            open_sample: self.open_sample(h),
        })
    }

    fn candidates(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<(Tid, Oid)>> {
        self.open_candidates.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Up to [`OPEN_SAMPLE`] open revisions with serial `<= horizon`, the
    /// highest serials first, each checked to be held and open at `horizon`.
    fn open_sample(&self, horizon: Tid) -> Vec<(Oid, Tid)> {
        if self.unseeded.load(std::sync::atomic::Ordering::Acquire) {
            // A reopened arena: its open revisions are known once verified.
            // Until then the sample would be partial, and a partial sample
            // could miss exactly the newest revisions a restored backup
            // lacks: send none (the client proves with the witness or its
            // iterator, or cannot prove and flushes).
            let Some(found) = self.cache.open_revisions(OPEN_CANDIDATES) else {
                return Vec::new();
            };
            let mut c = self.candidates();
            c.extend(found.into_iter().map(|(oid, serial)| (serial, oid)));
            while c.len() > OPEN_CANDIDATES {
                c.pop_first();
            }
            drop(c);
            self.unseeded.store(false, std::sync::atomic::Ordering::Release);
        }
        let candidates: Vec<(Tid, Oid)> = self.candidates().iter().rev().copied().collect();
        let mut sample = Vec::new();
        let mut gone = Vec::new();
        for (serial, oid) in candidates {
            if sample.len() == OPEN_SAMPLE {
                break;
            }
            if serial > horizon {
                continue;
            }
            match self.cache.revision_at(oid, horizon) {
                Some((s, None)) if s == serial => sample.push((oid, serial)),
                _ => gone.push((serial, oid)),
            }
        }
        let mut c = self.candidates();
        for g in gone {
            c.remove(&g);
        }
        sample
    }

    /// A client lost invalidations up to `at` (ZEO's `invalidateCache`, a
    /// refused gap): if `at` is past the horizon, open revisions are dropped
    /// and the log restarts at `at`; otherwise the log already covers it.
    /// Returns whether the log restarted.
    pub fn resync(&self, at: Tid) -> bool {
        match self.cache.horizon() {
            Some(h) if at <= h => false,
            _ => {
                self.cache.start_log(at);
                true
            }
        }
    }

    /// See [`SnapshotCache::lookup`].
    pub fn lookup(&self, oid: Oid, view: Tid) -> Option<C::Hit> {
        self.cache.lookup(oid, view)
    }

    /// See [`SnapshotCache::store`].
    ///
    /// # Errors
    /// As [`SnapshotCache::store`].
    pub fn store(
        &self,
        oid: Oid,
        serial: Tid,
        end: Option<Tid>,
        view: Tid,
        state: C::State,
    ) -> Result<StoreOutcome, CoreError> {
        let out = self.cache.store(oid, serial, end, view, state)?;
        if out == StoreOutcome::Open {
            let mut c = self.candidates();
            c.insert((serial, oid));
            while c.len() > OPEN_CANDIDATES {
                c.pop_first();
            }
        }
        Ok(out)
    }

    /// See [`SnapshotCache::report`].
    ///
    /// # Errors
    /// As [`SnapshotCache::report`].
    pub fn report(&self, from: Tid, to: Tid, changes: &[(Oid, Tid)]) -> Result<Tid, CoreError> {
        self.cache.report(from, to, changes)
    }

    /// Applies a collapsed report (ZEO's reconnect and `getInvalidations`,
    /// RelStorage's poll, a summarised catch-up): see
    /// [`SnapshotCache::report_collapsed`].
    ///
    /// # Errors
    /// As [`SnapshotCache::report_collapsed`].
    pub fn report_collapsed(&self, from: Tid, to: Tid, changes: &[(Oid, Tid)]) -> Result<Tid, CoreError> {
        self.cache.report_collapsed(from, to, changes)
    }

    /// Reclaims what no registered view can see: the low-water mark is the
    /// oldest view, or the horizon when no view is registered.
    pub fn reclaim(&self) -> usize {
        let Some(h) = self.cache.horizon() else {
            return 0;
        };
        let low = self.views.low_water_mark().map_or(h, |l| l.min(h));
        self.cache.reclaim(low)
    }

    /// Keeps the invalidation log at most `max_changes` long: while it is
    /// longer, the oldest view is detached (unregistered) and invisible
    /// revisions are reclaimed again (invariant 5: a view that holds the
    /// low-water mark back too long is detached, never served from a
    /// truncated log: its open stores fall below the log's start and are
    /// refused). Returns the views detached.
    pub fn enforce_log_limit(&self, max_changes: usize) -> Vec<(ViewId, Tid)> {
        let mut detached = Vec::new();
        while self.cache.log_len() > max_changes {
            match self.views.detach_oldest() {
                Some(v) => detached.push(v),
                None => {
                    self.reclaim();
                    break;
                }
            }
            self.reclaim();
        }
        self.detached
            .fetch_add(detached.len() as u64, std::sync::atomic::Ordering::Relaxed);
        detached
    }

    /// Drops everything (a pack, an operator's request).
    pub fn flush(&self) {
        self.cache.flush();
        self.candidates().clear();
    }

    /// Registers a view at `at`.
    pub fn register_view(&self, at: Tid) -> ViewId {
        self.views.register(at)
    }

    /// Advances a view.
    ///
    /// # Errors
    /// [`CoreError::UnknownView`].
    pub fn advance_view(&self, id: ViewId, to: Tid) -> Result<(), CoreError> {
        self.views.advance(id, to)
    }

    /// Releases a view.
    ///
    /// # Errors
    /// [`CoreError::UnknownView`].
    pub fn release_view(&self, id: ViewId) -> Result<Tid, CoreError> {
        self.views.release(id)
    }

    /// Sizes and counters.
    pub fn stats(&self) -> DatabaseStats {
        DatabaseStats {
            cache: self.cache.stats(),
            views: self.views.len() as u64,
            horizon: self.cache.horizon(),
            low_water_mark: self.views.low_water_mark(),
            log_start: self.cache.log_start(),
            log_len: self.cache.log_len() as u64,
            detached: self.detached.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

#[cfg(all(test, not(loom), feature = "snapshot"))]
mod tests {
    use super::*;

    /// Invariant 5: reclamation removes exactly what no registered view
    /// can see.
    #[test]
    fn reclamation_keeps_what_a_registered_view_sees() {
        let db: Database<Vec<u8>> = Database::new(1 << 20);
        db.attach(Tid(20), None);
        let view = db.register_view(Tid(12));
        db.store(Oid(1), Tid(5), Some(Tid(13)), Tid(20), Arc::new(b"seen at 12".to_vec()))
            .unwrap();
        db.store(
            Oid(2),
            Tid(5),
            Some(Tid(12)),
            Tid(20),
            Arc::new(b"ended at 12".to_vec()),
        )
        .unwrap();
        db.store(Oid(3), Tid(5), Some(Tid(9)), Tid(20), Arc::new(b"ended at 9".to_vec()))
            .unwrap();
        assert_eq!(db.reclaim(), 2, "end <= 12 is invisible to the view at 12");
        assert!(db.lookup(Oid(1), Tid(12)).is_some(), "the view at 12 still sees oid 1");
        assert!(db.lookup(Oid(2), Tid(11)).is_none());
        assert_eq!(db.stats().cache.entries, 1);
        // Once the view moves on, its old revisions go too.
        db.advance_view(view, Tid(20)).unwrap();
        assert_eq!(db.reclaim(), 1);
        assert_eq!(db.stats().cache.entries, 0);
    }

    /// Invariant 6: a state handed to several readers is one shared,
    /// immutable allocation (`Arc<S>`; the API has no way to mutate it).
    #[test]
    fn hits_share_one_immutable_state() {
        let db: Database<Vec<u8>> = Database::new(1 << 20);
        db.attach(Tid(1), None);
        db.store(Oid(1), Tid(1), None, Tid(1), Arc::new(b"state".to_vec()))
            .unwrap();
        let (a, b) = (db.lookup(Oid(1), Tid(1)).unwrap(), db.lookup(Oid(1), Tid(1)).unwrap());
        assert!(Arc::ptr_eq(&a.state, &b.state));
    }

    #[test]
    fn a_view_holding_the_log_back_is_detached() {
        let db: Database<Vec<u8>> = Database::new(1 << 20);
        db.attach(Tid(10), None);
        let old = db.register_view(Tid(10));
        let recent = db.register_view(Tid(30));
        let changes: Vec<(Oid, Tid)> = (11..=30).map(|t| (Oid(t), Tid(t))).collect();
        db.report(Tid(10), Tid(30), &changes).unwrap();
        db.reclaim();
        assert_eq!(db.stats().log_len, 20, "the old view holds the log");
        // A revision current at view 12 from the old view's time.
        let detached = db.enforce_log_limit(5);
        assert_eq!(detached, vec![(old, Tid(10))]);
        let s = db.stats();
        assert_eq!((s.views, s.low_water_mark, s.detached), (1, Some(Tid(30)), 1));
        assert!(s.log_len <= 5);
        // Its stores are refused now: the log no longer covers its view.
        let out = db.store(Oid(99), Tid(10), None, Tid(12), Arc::new(vec![])).unwrap();
        assert!(matches!(out, StoreOutcome::Refused(_)), "{out:?}");
        assert_eq!(db.advance_view(old, Tid(31)), Err(CoreError::UnknownView(old)));
        db.release_view(recent).unwrap();
    }

    /// Invariant 7: a client whose `lastTransaction` is at or past the
    /// horizon joins only with a proof of the current horizon; the proof
    /// request names the horizon transaction's oids and the newest open
    /// revisions.
    #[test]
    fn joining_needs_a_proof_of_the_current_horizon() {
        let db: Database<Vec<u8>> = Database::new(1 << 20);
        assert_eq!(db.attach(Tid(10), Some(Tid(10))), AttachOutcome::Started);
        // The log started at a tid no report named: no witness, and no
        // open revision yet.
        let empty = Proof {
            horizon: Tid(10),
            witness: vec![],
            open_sample: vec![],
        };
        assert_eq!(db.attach(Tid(10), None), AttachOutcome::Prove(empty.clone()));
        assert_eq!(db.attach(Tid(12), Some(Tid(9))), AttachOutcome::Prove(empty));
        assert_eq!(db.attach(Tid(12), Some(Tid(10))), AttachOutcome::Joined);
        db.report(
            Tid(10),
            Tid(20),
            &[(Oid(7), Tid(20)), (Oid(3), Tid(20)), (Oid(1), Tid(15))],
        )
        .unwrap();
        for (oid, serial) in [(1, 15), (3, 20), (4, 8), (5, 9), (6, 6)] {
            db.store(Oid(oid), Tid(serial), None, Tid(20), Arc::new(vec![]))
                .unwrap();
        }
        // Stored later, but already closed by the log: never sampled.
        db.store(Oid(7), Tid(2), None, Tid(10), Arc::new(vec![])).unwrap();
        let proof = Proof {
            horizon: Tid(20),
            witness: vec![Oid(3), Oid(7)],
            open_sample: vec![(Oid(3), Tid(20)), (Oid(1), Tid(15)), (Oid(5), Tid(9)), (Oid(4), Tid(8))],
        };
        assert_eq!(db.attach(Tid(20), None), AttachOutcome::Prove(proof.clone()));
        // A proof of the old horizon is not one of the new.
        assert_eq!(db.attach(Tid(25), Some(Tid(10))), AttachOutcome::Prove(proof));
        assert_eq!(
            db.attach(Tid(19), Some(Tid(20))),
            AttachOutcome::Behind { horizon: Tid(20) }
        );
        assert_eq!(db.attach(Tid(25), Some(Tid(20))), AttachOutcome::Joined);
        // A revision closed since drops out of the sample.
        db.report(Tid(20), Tid(21), &[(Oid(3), Tid(21))]).unwrap();
        match db.attach(Tid(21), None) {
            AttachOutcome::Prove(p) => {
                assert_eq!(p.witness, vec![Oid(3)]);
                assert_eq!(
                    p.open_sample,
                    vec![(Oid(1), Tid(15)), (Oid(5), Tid(9)), (Oid(4), Tid(8)), (Oid(6), Tid(6))]
                );
            }
            other => panic!("{other:?}"),
        }
        // After a flush the next client starts the log again.
        db.flush();
        assert_eq!(db.attach(Tid(30), None), AttachOutcome::Started);
    }
}
