//! [`ArenaCache`]: one database's revisions in the shared arena, under the
//! same MVCC rules as [`crate::SnapshotCache`] (the rules themselves live in
//! [`crate::rules`] and are shared: `plan_store`, `closing`).
//!
//! Every database of a sidecar has its own invalidation log and a slot in
//! the one [`SharedArena`]. Lock order: a database's log, then the arena's
//! writer. Lookups take no lock (see [`super::reader`]).

use super::layout::OPEN;
use super::reader::{self, Found};
use super::slots::Slot;
use super::writer::{ArenaStats, ArenaWriter};
use super::{Geometry, Memory};
use crate::error::CoreError;
use crate::invalidation::{InvalidationLog, LogLock};
use crate::revision::{Oid, Tid};
use crate::rules::{closing, collapsing, plan_store, CacheStats, Closing, Refusal, StoreOutcome, StorePlan};
use crate::sync::{lock, Mutex, MutexGuard};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The arena of a sidecar: its memory and its single writer.
pub struct SharedArena {
    memory: Arc<Memory>,
    geometry: Geometry,
    writer: Mutex<ArenaWriter>,
}

impl SharedArena {
    /// Shares `writer`'s arena.
    pub fn new(writer: ArenaWriter) -> Arc<Self> {
        Arc::new(SharedArena {
            memory: writer.memory().clone(),
            geometry: *writer.geometry(),
            writer: Mutex::new(writer),
        })
    }

    /// The arena's geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The writer, locked.
    pub fn writer(&self) -> MutexGuard<'_, ArenaWriter> {
        lock(&self.writer)
    }

    /// The cache of database `key`, in the slot that holds it already (a
    /// reopened file: its log restarts at the persisted horizon, so closed
    /// revisions answer at once and open ones up to that horizon), else a
    /// free one, else one no [`ArenaCache`] holds (see
    /// [`ArenaWriter::attach_database`]). The cache holds a lease on the
    /// slot until it is dropped. `None` when every slot is held.
    ///
    /// One cache per key at a time: a second one of the same key would
    /// share the slot with its own log (the sidecar keeps one per key).
    pub fn database(self: &Arc<Self>, key: &str) -> Option<ArenaCache> {
        let mut w = self.writer();
        let slot = w.attach_database(key)?;
        w.lease(slot);
        let horizon = w.horizon(slot);
        drop(w);
        Some(ArenaCache {
            arena: self.clone(),
            index: slot.index,
            identity: AtomicU64::new(slot.identity),
            log: LogLock::new((horizon != 0).then(|| InvalidationLog::starting_at(Tid(horizon)))),
            counters: Counters::default(),
        })
    }

    /// Counts reads of revisions `(oid, serial)` of slot `slot` (hits a
    /// client reported): eviction keeps what is read. Nothing if the slot
    /// no longer holds that database.
    pub fn touch(&self, slot: Slot, revisions: &[(u64, u64)]) {
        let w = self.writer();
        for &(oid, serial) in revisions {
            w.touch(slot, oid, serial);
        }
    }

    /// Sizes and counters of the whole arena.
    pub fn stats(&self) -> ArenaStats {
        self.writer().stats()
    }
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    stores: AtomicU64,
    refused: AtomicU64,
    invalidations: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// One database's cache in a [`SharedArena`].
///
/// Once [`ArenaCache::release`]d (or its slot given to another database),
/// the cache is inert: every write checks, under the arena writer's lock
/// that release takes too, that the slot still holds this database
/// (its identity), and does nothing otherwise; lookups miss.
pub struct ArenaCache {
    arena: Arc<SharedArena>,
    index: u8,
    /// The slot's identity: new after a flush (stored under the log lock).
    identity: AtomicU64,
    log: LogLock,
    counters: Counters,
}

impl ArenaCache {
    /// The database's slot in the arena and its identity (clients look up
    /// with both).
    pub fn slot(&self) -> Slot {
        Slot {
            index: self.index,
            identity: self.identity.load(Ordering::Acquire),
        }
    }

    /// Counts reads of revisions `(oid, serial)` (hits a client
    /// reported): eviction keeps what is read. Nothing once released.
    pub fn touch(&self, revisions: &[(u64, u64)]) {
        self.arena.touch(self.slot(), revisions);
    }

    /// The arena.
    pub fn arena(&self) -> &Arc<SharedArena> {
        &self.arena
    }

    /// The revision of `oid` visible at `view`, as a client reads it.
    pub fn lookup(&self, oid: Oid, view: Tid) -> Option<Found> {
        let found = reader::lookup(
            self.arena.memory.words(),
            &self.arena.geometry,
            self.slot(),
            oid.0,
            view.0,
        )
        .ok();
        match &found {
            Some(f) => {
                bump(&self.counters.hits, 1);
                self.arena.touch(self.slot(), &[(oid.0, f.serial)]);
            }
            None => bump(&self.counters.misses, 1),
        }
        found
    }

    /// Stores a revision loaded at `view` (rules of
    /// [`crate::SnapshotCache::store`], invariant 3).
    ///
    /// # Errors
    /// [`CoreError::BadStore`].
    pub fn store(
        &self,
        oid: Oid,
        serial: Tid,
        end: Option<Tid>,
        view: Tid,
        state: &[u8],
    ) -> Result<StoreOutcome, CoreError> {
        let log = self.log.lock();
        let mut w = self.arena.writer();
        let known = w.revisions(self.slot(), oid.0);
        let plan = plan_store(log.as_ref(), oid, serial, end, view, || {
            known.iter().any(|&(_, s, _)| s > serial.0)
        })?;
        let end = match plan {
            StorePlan::Refuse(r) => {
                bump(&self.counters.refused, 1);
                return Ok(StoreOutcome::Refused(r));
            }
            StorePlan::Insert(end) => end,
        };
        let low_water = w.low_water(self.slot());
        if end != OPEN && end <= low_water {
            bump(&self.counters.refused, 1);
            return Ok(StoreOutcome::Refused(Refusal::Invisible));
        }
        // Short chains whatever the store pattern: the oid's revisions no
        // registered view can see go, and an open revision older than this
        // one cannot be current (this one is a later change of the oid):
        // at most one open revision per oid.
        for &(at, s, e) in &known {
            if s == serial.0 {
                continue;
            }
            if e != OPEN && e <= low_water {
                w.reclaim_record(at);
            } else if e == OPEN && s < serial.0 {
                w.remove(at);
            }
        }
        if let Some(&(at, _, known_end)) = known.iter().find(|&&(_, s, _)| s == serial.0) {
            if end != OPEN && known_end == OPEN {
                w.set_end(at, end);
            }
        } else if w.insert(self.slot(), oid.0, serial.0, end, state).is_err() {
            bump(&self.counters.refused, 1);
            return Ok(StoreOutcome::Refused(Refusal::NotCacheable));
        }
        bump(&self.counters.stores, 1);
        Ok(if end == OPEN {
            StoreOutcome::Open
        } else {
            StoreOutcome::Closed(Tid(end))
        })
    }

    /// Applies an invalidation report (invariant 4): closes the revisions it
    /// ends, then publishes the new horizon in the arena.
    ///
    /// # Errors
    /// [`CoreError::Gap`], [`CoreError::BadReport`].
    pub fn report(&self, from: Tid, to: Tid, changes: &[(Oid, Tid)]) -> Result<Tid, CoreError> {
        let applied = self.log.apply(from, to, changes)?;
        let mut w = self.arena.writer();
        let low_water = w.low_water(self.slot());
        for &(oid, tid) in &applied.changes {
            let floor = w
                .revisions(self.slot(), oid.0)
                .into_iter()
                .filter(|&(at, _, end)| {
                    // Invisible to every registered view: reclaimed here,
                    // which keeps the oid's chain short.
                    let invisible = end != OPEN && end <= low_water;
                    if invisible {
                        w.reclaim_record(at);
                    }
                    !invisible
                })
                .filter(|&(_, s, _)| s < tid.0)
                .max_by_key(|&(_, s, _)| s);
            if let Some((at, _, end)) = floor {
                match closing(end, tid) {
                    Closing::Close => w.set_end(at, tid.0),
                    Closing::Drop => w.remove(at),
                    Closing::Keep => {}
                }
            }
        }
        bump(&self.counters.invalidations, changes.len() as u64);
        w.publish_horizon(self.slot(), applied.horizon.0);
        Ok(applied.horizon)
    }

    /// Applies a collapsed report (invariants 3 and 4, see
    /// [`InvalidationLog::apply_collapsed`]): for each listed oid whose
    /// newest change `T` is past the prior horizon `H0`, its open revision
    /// is closed at `H0 + 1` and a closed one that claims validity past `T`
    /// is dropped ([`crate::rules::collapsing`]); then the new horizon is
    /// published in the arena (the order of [`ArenaCache::report`]).
    ///
    /// # Errors
    /// [`CoreError::Gap`], [`CoreError::BadReport`].
    pub fn report_collapsed(&self, from: Tid, to: Tid, changes: &[(Oid, Tid)]) -> Result<Tid, CoreError> {
        let (_log, applied) = self.log.apply_collapsed(from, to, changes)?;
        let mut w = self.arena.writer();
        let close_at = applied.prior.0.saturating_add(1);
        let low_water = w.low_water(self.slot());
        for &(oid, newest) in &applied.uncertain {
            for (at, serial, end) in w.revisions(self.slot(), oid.0) {
                if end != OPEN && end <= low_water {
                    w.reclaim_record(at); // invisible: keeps the chain short
                    continue;
                }
                match collapsing(serial, end, applied.prior, newest) {
                    Closing::Close => w.set_end(at, close_at),
                    Closing::Drop => w.remove(at),
                    Closing::Keep => {}
                }
            }
        }
        bump(&self.counters.invalidations, changes.len() as u64);
        w.publish_horizon(self.slot(), applied.horizon.0);
        Ok(applied.horizon)
    }

    /// Restarts the log at `at`: open revisions are dropped first (their
    /// validity after the old horizon is unknown), then the horizon moves.
    pub fn start_log(&self, at: Tid) {
        let mut log = self.log.lock();
        let mut w = self.arena.writer();
        *log = Some(InvalidationLog::starting_at(at));
        w.restart_database(self.slot(), at.0);
    }

    /// Drops everything of this database (a pack, a restored backup).
    pub fn flush(&self) {
        let mut log = self.log.lock();
        *log = None;
        if let Some(new) = self.arena.writer().flush_database(self.slot()) {
            // Under the log lock, which every write of this cache takes
            // first: no write starts with the old identity after this.
            self.identity.store(new.identity, Ordering::Release);
        }
    }

    /// Truncates the log below `low_water` and lets eviction drop closed
    /// revisions that end at or below it (invariant 5). Returns 0: the
    /// arena reclaims lazily, segment by segment.
    pub fn reclaim(&self, low_water: Tid) -> usize {
        let (_log, Some(low_water)) = self.log.truncate(low_water) else {
            return 0;
        };
        self.arena.writer().set_low_water(self.slot(), low_water.0);
        0
    }

    /// Evicts one revision, as the arena's eviction would (tests, tools).
    pub fn evict(&self, oid: Oid, serial: Tid) {
        let _log = self.log.lock();
        let mut w = self.arena.writer();
        if let Some(&(at, _, _)) = w.revisions(self.slot(), oid.0).iter().find(|r| r.1 == serial.0) {
            w.remove(at);
        }
    }

    /// Frees the database's slot (the sidecar dropped the database): from
    /// now on this cache writes nothing into the arena (a request still in
    /// flight on it is dropped), and the slot may be given to another key.
    pub fn release(&self) {
        let _log = self.log.lock();
        self.arena.writer().release_database(self.slot());
    }

    /// The horizon, `None` before the log started.
    pub fn horizon(&self) -> Option<Tid> {
        self.log.horizon()
    }

    /// The log's start, `None` before the log started.
    pub fn log_start(&self) -> Option<Tid> {
        self.log.log_start()
    }

    /// The horizon and up to four oids changed at exactly it
    /// ([`InvalidationLog::witness`]; empty after a restart: it lives in
    /// memory only), `None` before the log started.
    pub fn witness(&self) -> Option<(Tid, Vec<Oid>)> {
        self.log.witness()
    }

    /// The `limit` open revisions of a reopened file's database with the
    /// highest serials, `(oid, serial)`, highest first, as the background
    /// verification found them; `None` until it has verified every segment
    /// (no scan on the first attach: the first hit after a restart waits for
    /// nothing). Empty for a database of a file this run created.
    pub fn open_revisions(&self, limit: usize) -> Option<Vec<(Oid, Tid)>> {
        let found = self.arena.writer().recovered_open(self.slot())?;
        Some(found.into_iter().take(limit).map(|(s, o)| (Oid(o), Tid(s))).collect())
    }

    /// `(serial, end)` of the revision of `oid` visible at `view`, without
    /// counting a hit or a read (the attach rule's open sample).
    pub fn revision_at(&self, oid: Oid, view: Tid) -> Option<(Tid, Option<Tid>)> {
        reader::lookup(
            self.arena.memory.words(),
            &self.arena.geometry,
            self.slot(),
            oid.0,
            view.0,
        )
        .ok()
        .map(|f| (Tid(f.serial), f.end.map(Tid)))
    }

    /// Changes held in the log.
    pub fn log_len(&self) -> usize {
        self.log.len()
    }

    /// Counters and sizes (entries and bytes of this database's slot).
    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        let ((entries, bytes), dropped) = {
            let w = self.arena.writer();
            if w.holds(self.slot()) {
                (w.slot_usage(self.slot().index), w.slot_dropped(self.slot().index))
            } else {
                ((0, 0), Default::default())
            }
        };
        let read = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            entries,
            bytes,
            capacity: self.arena.geometry.file_bytes,
            hits: read(&c.hits),
            misses: read(&c.misses),
            stores: read(&c.stores),
            refused: read(&c.refused),
            invalidations: read(&c.invalidations),
            reclaimed: dropped.reclaimed,
            evicted: dropped.evicted,
        }
    }
}

impl Drop for ArenaCache {
    /// Gives the slot's lease back: a slot no cache holds may be freed for
    /// another key (its revisions stay until then).
    fn drop(&mut self) {
        self.arena.writer().unlease(self.slot());
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::arena::layout;

    fn arena(segments: u64, segment_words: u64) -> Arc<SharedArena> {
        let g = Geometry::small(segments, segment_words);
        SharedArena::new(ArenaWriter::create(Arc::new(Memory::heap(g.file_bytes)), g, 7))
    }

    fn state(oid: u64) -> Vec<u8> {
        vec![oid as u8; 40]
    }

    #[test]
    fn a_stored_revision_is_read_back_and_closed_by_a_report() {
        let a = arena(8, 4096);
        let db = a.database("db").unwrap();
        db.start_log(Tid(10));
        assert_eq!(
            db.store(Oid(1), Tid(5), None, Tid(10), &state(1)),
            Ok(StoreOutcome::Open)
        );
        let hit = db.lookup(Oid(1), Tid(10)).unwrap();
        assert_eq!((hit.serial, hit.end, hit.state), (5, None, state(1)));
        assert!(
            db.lookup(Oid(1), Tid(11)).is_none(),
            "open revisions stop at the horizon"
        );
        assert!(db.lookup(Oid(1), Tid(4)).is_none());
        db.report(Tid(10), Tid(12), &[(Oid(1), Tid(12))]).unwrap();
        assert_eq!(db.lookup(Oid(1), Tid(11)).unwrap().end, Some(12));
        assert!(db.lookup(Oid(1), Tid(12)).is_none());
        // Another database never sees it.
        let other = a.database("other").unwrap();
        other.start_log(Tid(10));
        assert!(other.lookup(Oid(1), Tid(10)).is_none());
        // A flush drops it at once.
        db.flush();
        assert!(db.lookup(Oid(1), Tid(11)).is_none());
        assert_eq!(a.stats().entries, 0);
    }

    #[test]
    fn eviction_recycles_segments_and_keeps_what_is_read() {
        // 16 segments of ~7 records: room for ~100 of the 1,000 stored.
        let a = arena(16, 4 + 7 * 10);
        let db = a.database("db").unwrap();
        db.start_log(Tid(1));
        for oid in 0..1000u64 {
            db.store(Oid(oid), Tid(1), None, Tid(1), &state(oid)).unwrap();
            // Oids 0..10 are read after every store.
            for hot in 0..10u64.min(oid + 1) {
                assert_eq!(
                    db.lookup(Oid(hot), Tid(1)).map(|f| f.state),
                    Some(state(hot)),
                    "hot oid {hot}"
                );
            }
        }
        let s = a.stats();
        // Per database: every drop is counted, as eviction (read nothing
        // since) here: no low-water mark was set.
        let d = db.stats();
        assert_eq!((d.evicted, d.reclaimed), (s.evicted, 0), "{d:?}");
        assert!(s.evicted > 800, "{s:?}");
        assert!(s.promoted > 0 && s.main_segments > 0, "{s:?}");
        assert_eq!(s.small_segments + s.main_segments + s.free_segments, 16);
        // Everything still linked reads back whole.
        let found = (0..1000u64).filter(|&o| db.lookup(Oid(o), Tid(1)).is_some()).count() as u64;
        assert_eq!(found, s.entries);
    }

    /// Per-database counters tell revisions dropped for room from those
    /// no view could see any more (invariant 5), and another database's
    /// counters stay its own.
    #[test]
    fn eviction_counts_reclaimed_history_apart_from_evicted_revisions() {
        let a = arena(16, 4 + 7 * 10);
        let db = a.database("db").unwrap();
        let other = a.database("other").unwrap();
        db.start_log(Tid(10));
        other.start_log(Tid(1));
        for oid in 0..50u64 {
            db.store(Oid(oid), Tid(2), Some(Tid(5)), Tid(9), &state(oid)).unwrap();
        }
        // The low-water mark moves to 9: history that ended at 5 is invisible.
        db.reclaim(Tid(9));
        // Room is needed: the old history goes first.
        for oid in 0..200u64 {
            other.store(Oid(oid), Tid(1), None, Tid(1), &state(oid)).unwrap();
        }
        let (d, o) = (db.stats(), other.stats());
        assert!(d.reclaimed > 0 && d.evicted == 0, "{d:?}");
        assert!(o.evicted > 0 && o.reclaimed == 0, "{o:?}");
        assert_eq!(d.reclaimed + o.evicted, a.stats().evicted);
    }

    /// The benchmark's store pattern: one oid committed over and over,
    /// loaded by views at the last commit (open) and a few commits back
    /// (closed, from `loadBefore`), views moving on and the sidecar's
    /// reclaim pass following them. Room for everything, so eviction never
    /// shortens the chain: stores and reports must (the trace kept up to
    /// 67 revisions of one oid).
    #[test]
    fn a_hot_oids_chain_stays_short_whatever_the_store_pattern() {
        let a = arena(8, 1 << 16);
        let db = a.database("db").unwrap();
        db.start_log(Tid(1));
        db.store(Oid(1), Tid(1), None, Tid(1), &state(1)).unwrap();
        let mut longest = 0;
        for t in 2..2000u64 {
            db.report(Tid(t - 1), Tid(t), &[(Oid(1), Tid(t))]).unwrap();
            db.store(Oid(1), Tid(t), None, Tid(t), &state(1)).unwrap();
            if t > 4 {
                db.store(Oid(1), Tid(t - 3), Some(Tid(t - 2)), Tid(t - 3), &state(1))
                    .unwrap();
            }
            // The oldest registered view is 5 commits back.
            db.reclaim(Tid(t.saturating_sub(5)));
            let chain = a.writer().revisions(db.slot(), 1);
            let open = chain.iter().filter(|r| r.2 == OPEN).count();
            assert!(open <= 1, "{open} open revisions of one oid at {t}");
            longest = longest.max(chain.len());
        }
        assert!(longest <= 7, "a chain of {longest} revisions of one oid");
        assert_eq!(a.stats().evicted, 0, "nothing was evicted for room");
        assert!(db.stats().reclaimed > 1900, "{:?}", db.stats());
        // What the views can still see is kept.
        assert_eq!(db.lookup(Oid(1), Tid(1999)).map(|f| f.serial), Some(1999));
        assert_eq!(db.lookup(Oid(1), Tid(1996)).map(|f| f.serial), Some(1996));
    }

    /// A closed store that no registered view can see is refused: storing
    /// it would only lengthen its oid's chain.
    #[test]
    fn a_closed_store_below_the_low_water_mark_is_refused() {
        let a = arena(8, 4096);
        let db = a.database("db").unwrap();
        db.start_log(Tid(10));
        db.reclaim(Tid(8));
        assert_eq!(
            db.store(Oid(1), Tid(2), Some(Tid(8)), Tid(9), &state(1)),
            Ok(StoreOutcome::Refused(Refusal::Invisible))
        );
        assert_eq!(
            db.store(Oid(1), Tid(2), Some(Tid(9)), Tid(8), &state(1)),
            Ok(StoreOutcome::Closed(Tid(9)))
        );
        assert_eq!(a.writer().revisions(db.slot(), 1).len(), 1);
    }

    /// True stores never make a second open revision of an oid (the model
    /// test checks every hit); a client sending false ones (an open
    /// revision 8 while 5 is open, the change at 8 never reported) still
    /// leaves at most one: the older cannot be current.
    #[test]
    fn an_oid_never_has_two_open_revisions() {
        let a = arena(8, 4096);
        let db = a.database("db").unwrap();
        db.start_log(Tid(10));
        db.store(Oid(1), Tid(5), None, Tid(10), &state(1)).unwrap();
        db.store(Oid(1), Tid(8), None, Tid(10), &state(1)).unwrap();
        let chain = a.writer().revisions(db.slot(), 1);
        assert_eq!(chain.iter().map(|r| (r.1, r.2)).collect::<Vec<_>>(), vec![(8, OPEN)]);
        assert!(db.lookup(Oid(1), Tid(7)).is_none(), "5's validity is unknown");
    }

    #[test]
    fn a_pointer_into_a_recycled_segment_is_a_miss() {
        let a = arena(8, 4 + 10);
        let db = a.database("db").unwrap();
        db.start_log(Tid(1));
        db.store(Oid(1), Tid(1), None, Tid(1), &state(1)).unwrap();
        let g = *a.geometry();
        let key = layout::key(db.slot().index, 1, 1).unwrap();
        let bucket = g.bucket_word_of(key);
        let stale = a.memory.words()[bucket].load(Ordering::Relaxed);
        // Fill the arena with other oids until oid 1's segment is reused.
        for oid in 2..200u64 {
            db.store(Oid(oid), Tid(1), None, Tid(1), &state(oid)).unwrap();
        }
        assert!(db.lookup(Oid(1), Tid(1)).is_none(), "evicted");
        // Put the stale pointer back: the reader must refuse it.
        a.memory.words()[bucket].store(stale, Ordering::Relaxed);
        assert_eq!(
            reader::lookup(a.memory.words(), &g, db.slot(), 1, 1),
            Err(reader::Miss::Invalid)
        );
    }

    #[test]
    fn a_flipped_byte_in_a_record_is_a_miss() {
        let a = arena(8, 4096);
        let db = a.database("db").unwrap();
        db.start_log(Tid(1));
        db.store(Oid(1), Tid(1), None, Tid(1), &state(1)).unwrap();
        let (at, _, _) = a.writer().revisions(db.slot(), 1)[0];
        for word in [
            layout::record::SERIAL,
            layout::record::END,
            layout::RECORD_HEADER_WORDS + 2,
        ] {
            let w = &a.memory.words()[at + word];
            let v = w.load(Ordering::Relaxed);
            w.store(v ^ 0x100, Ordering::Relaxed);
            assert!(db.lookup(Oid(1), Tid(1)).is_none(), "word {word} flipped");
            w.store(v, Ordering::Relaxed);
            assert!(db.lookup(Oid(1), Tid(1)).is_some());
        }
    }

    #[test]
    fn resync_drops_open_revisions_only() {
        let a = arena(8, 4096);
        let db = a.database("db").unwrap();
        db.start_log(Tid(10));
        db.store(Oid(1), Tid(5), None, Tid(10), &state(1)).unwrap();
        db.store(Oid(2), Tid(5), Some(Tid(8)), Tid(10), &state(2)).unwrap();
        db.start_log(Tid(20));
        assert!(db.lookup(Oid(1), Tid(10)).is_none());
        assert!(db.lookup(Oid(2), Tid(7)).is_some());
        assert_eq!(a.stats().entries, 1);
    }

    /// Every write of a stale handle (store, report, resync, reclaim,
    /// flush, touch, evict), before and after its slot is given to another
    /// database.
    fn use_stale(old: &ArenaCache) {
        let _ = old.store(Oid(2), Tid(5), None, Tid(10), &state(2));
        let _ = old.report(Tid(10), Tid(50), &[(Oid(3), Tid(50))]);
        old.touch(&[(3, 15)]);
        old.reclaim(Tid(40));
        old.evict(Oid(3), Tid(15));
        old.start_log(Tid(60));
        let _ = old.store(Oid(4), Tid(55), None, Tid(60), &state(4));
        old.flush();
    }

    #[test]
    fn a_released_cache_writes_nothing_into_its_old_slot() {
        let a = arena(8, 4096);
        let old = a.database("old").unwrap();
        old.start_log(Tid(10));
        old.store(Oid(1), Tid(5), None, Tid(10), &state(1)).unwrap();
        old.release();
        use_stale(&old);
        // The slot is free again: the next database gets it.
        let new = a.database("new").unwrap();
        assert_eq!(new.slot().index, old.slot().index, "the released slot is reused");
        assert_ne!(new.slot().identity, old.slot().identity);
        new.start_log(Tid(20));
        new.store(Oid(3), Tid(15), None, Tid(20), &state(3)).unwrap();
        use_stale(&old);
        // The new database sees nothing of the old one, and all of its own.
        for oid in [1, 2, 4] {
            for view in [10, 20, 50, 60] {
                assert!(new.lookup(Oid(oid), Tid(view)).is_none(), "oid {oid} at {view}");
            }
        }
        let hit = new.lookup(Oid(3), Tid(20)).expect("its own revision");
        assert_eq!((hit.serial, hit.end), (15, None));
        assert!(new.lookup(Oid(3), Tid(21)).is_none(), "open only up to its own horizon");
        let words = a.memory.words();
        assert_eq!(reader::database(words, &a.geometry, new.slot()).map(|d| d.1), Some(20));
        assert_eq!(new.stats().entries, 1);
        assert_eq!(a.stats().entries, 1);
        assert!(old.lookup(Oid(3), Tid(20)).is_none(), "a released cache reads nothing");
    }

    /// After a restart the open revisions of the reopened file are known
    /// only once verification has read every segment: before, `None` (the
    /// attach rule then sends no open sample rather than a partial one).
    #[test]
    fn a_reopened_files_open_revisions_are_known_once_verified() {
        let g = Geometry::for_size(layout::MIN_FILE_BYTES, 4).unwrap();
        let memory = Arc::new(Memory::heap(g.file_bytes));
        let a = SharedArena::new(ArenaWriter::create(memory.clone(), g, 7));
        let db = a.database("db").unwrap();
        assert_eq!(db.open_revisions(4), Some(vec![]), "a new file has nothing to find");
        db.start_log(Tid(30));
        for oid in 1..=6u64 {
            db.store(Oid(oid), Tid(oid * 4), None, Tid(30), &state(oid)).unwrap();
        }
        db.store(Oid(9), Tid(2), Some(Tid(3)), Tid(30), &state(9)).unwrap();
        drop(db);
        drop(a);
        let (w, _) = ArenaWriter::recover(memory.clone(), 8).unwrap();
        let a = SharedArena::new(w);
        let db = a.database("db").unwrap();
        assert_eq!(db.open_revisions(4), None, "not verified yet");
        while a.writer().verify_next().is_some() {}
        assert_eq!(
            db.open_revisions(4),
            Some(vec![
                (Oid(6), Tid(24)),
                (Oid(5), Tid(20)),
                (Oid(4), Tid(16)),
                (Oid(3), Tid(12))
            ])
        );
    }

    #[test]
    fn a_stale_slot_misses_once_a_restart_gives_it_to_another_database() {
        let g = Geometry::for_size(layout::MIN_FILE_BYTES, 4).unwrap();
        let memory = Arc::new(Memory::heap(g.file_bytes));
        let a = SharedArena::new(ArenaWriter::create(memory.clone(), g, 7));
        let db = a.database("db").unwrap();
        db.start_log(Tid(10));
        db.store(Oid(1), Tid(5), None, Tid(10), &state(1)).unwrap();
        // What a client was given at Attach.
        let held = db.slot();
        assert!(reader::lookup(memory.words(), &g, held, 1, 10).is_ok());
        // Killed between storing a horizon and resealing the slot.
        let horizon = g.db_slot_word(held.index) + layout::db_slot::HORIZON;
        memory.words()[horizon].store(11, Ordering::Relaxed);
        drop(db);
        drop(a);
        let (w, found) = ArenaWriter::recover(memory.clone(), 8).unwrap();
        assert_eq!(found.damaged_databases, 1);
        let a = SharedArena::new(w);
        let other = a.database("other").unwrap();
        assert_eq!(other.slot().index, held.index, "the freed slot is reused");
        other.start_log(Tid(10));
        other.store(Oid(1), Tid(7), None, Tid(10), &state(9)).unwrap();
        assert_eq!(other.lookup(Oid(1), Tid(10)).unwrap().state, state(9));
        // The old client reads through the slot number it still holds.
        assert_eq!(
            reader::lookup(memory.words(), &g, held, 1, 10),
            Err(reader::Miss::NoDatabase),
            "another database's revision through a stale slot"
        );
    }

    /// The reader loads the slot's state, its horizon, and its state again;
    /// the writer flushes (or releases and reassigns) the slot between any
    /// two of those loads and publishes a horizon of the new state. The
    /// reader must never pair one generation with another's horizon.
    #[test]
    fn a_reader_never_pairs_a_generation_with_another_ones_horizon() {
        type Move = fn(&Arc<SharedArena>, &ArenaCache, Slot) -> Option<ArenaCache>;
        let moves: [(&str, Move, u64); 4] = [
            (
                "flush, then a lower horizon",
                |_, db, _| {
                    db.flush();
                    db.start_log(Tid(50));
                    None
                },
                50,
            ),
            (
                "flush, then a higher horizon",
                |_, db, _| {
                    db.flush();
                    db.start_log(Tid(200));
                    None
                },
                200,
            ),
            (
                "release, reassign, lower horizon",
                |a, db, _| {
                    db.release();
                    let n = a.database("n").unwrap();
                    n.start_log(Tid(50));
                    Some(n)
                },
                50,
            ),
            (
                "resync at a higher horizon",
                |_, db, _| {
                    db.start_log(Tid(200));
                    None
                },
                200,
            ),
        ];
        for (name, writer_move, new_horizon) in moves {
            for step in 0..2 {
                let a = arena(8, 4096);
                let db = a.database("db").unwrap();
                db.start_log(Tid(100));
                let slot = db.slot();
                let before = reader::database(a.memory.words(), &a.geometry, slot).unwrap();
                let mut keep = None;
                let seen = reader::database_stepped(a.memory.words(), &a.geometry, slot, |at| {
                    if at == step {
                        keep = writer_move(&a, &db, slot);
                    }
                });
                let after = keep
                    .as_ref()
                    .map(|n| n.slot())
                    .or(Some(slot))
                    .and_then(|s| reader::database(a.memory.words(), &a.geometry, s));
                if let Some(seen) = seen {
                    let consistent = seen == before || Some(seen) == after;
                    assert!(
                        consistent,
                        "{name}, step {step}: read {seen:?}, before {before:?}, after {after:?}"
                    );
                }
                if let Some(after) = after {
                    assert_eq!(after.1, new_horizon, "{name}");
                }
            }
        }
    }

    #[test]
    fn a_damaged_length_word_hides_no_open_revision_from_a_resync() {
        let a = arena(8, 4096);
        let db = a.database("db").unwrap();
        db.start_log(Tid(10));
        db.store(Oid(1), Tid(5), None, Tid(10), &state(1)).unwrap();
        db.store(Oid(2), Tid(5), None, Tid(10), &state(2)).unwrap();
        // Oid 1's length word damaged: a walk of the segment stops there.
        let (at, _, _) = a.writer().revisions(db.slot(), 1)[0];
        let word = &a.memory.words()[at + layout::record::LENGTH];
        word.store(word.load(Ordering::Relaxed) | layout::LENGTH_MASK, Ordering::Relaxed);
        // A resync: open revisions are of unknown validity past 10.
        db.start_log(Tid(20));
        assert!(
            db.lookup(Oid(2), Tid(15)).is_none(),
            "an open revision survived the resync past the damaged record"
        );
    }

    /// Real threads: the writer commits, reports and stores into a small
    /// arena that keeps recycling segments while readers look up at views
    /// up to the published horizon; every hit must be the revision visible
    /// at its view, whole.
    #[test]
    fn readers_racing_the_writer_never_get_a_wrong_hit() {
        use std::sync::atomic::AtomicBool;
        const N: u64 = 37;
        let a = arena(8, 4 + 4 * 10);
        let db = Arc::new(a.database("db").unwrap());
        db.start_log(Tid(1));
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicU64::new(0));
        let content =
            |oid: u64, serial: u64| -> Vec<u8> { (0..40).map(|i| (oid * 7 + serial * 13 + i) as u8).collect() };
        let readers: Vec<_> = (0..2)
            .map(|r| {
                let (a, db, stop, hits) = (a.clone(), db.clone(), stop.clone(), hits.clone());
                std::thread::spawn(move || {
                    let mut x = r as u64 + 1;
                    while !stop.load(Ordering::Relaxed) {
                        let Some((_, h)) = reader::database(a.memory.words(), &a.geometry, db.slot()) else {
                            continue;
                        };
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let view = h.saturating_sub((x >> 33) % 8);
                        let oid = (x >> 20) % N;
                        if let Ok(f) = reader::lookup(a.memory.words(), &a.geometry, db.slot(), oid, view) {
                            // Revisions of `oid` are the tids t with t % N == oid.
                            let expected = view - (view + N - oid) % N;
                            assert_eq!(f.serial, expected, "oid {oid} at view {view}");
                            assert_eq!(f.state, content(oid, f.serial), "torn state");
                            hits.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        // Ends on work done, not on time: 40,000 commits and 100 hits of
        // the readers, whenever the scheduler lets them run.
        let mut t = 2u64;
        while t < 40_000 || hits.load(Ordering::Relaxed) < 100 {
            db.report(Tid(t - 1), Tid(t), &[(Oid(t % N), Tid(t))]).unwrap();
            db.store(Oid(t % N), Tid(t), None, Tid(t), &content(t % N, t)).unwrap();
            t += 1;
            assert!(t < 1 << 40, "the readers never hit");
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
        assert!(a.stats().evicted > 10_000, "{:?}", a.stats());
    }
}
