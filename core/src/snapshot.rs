//! `SnapshotCache<S>`: revisions keyed by `(oid, serial)`, handed out as
//! Arc-shared immutable states, with the MVCC rules of docs/invariants.md enforced
//! at every read and write.
//!
//! Readers are lock-free: a lookup loads the horizon, finds the revision of
//! the oid with the greatest serial `<= view` in the index (a skiplist whose
//! memory crossbeam-epoch reclaims) and checks its interval. Writers — stores,
//! invalidation reports, reclamation — are serialised by one lock that also
//! guards the invalidation log, so a store's check against the log and its
//! insertion are atomic with respect to reports.
//!
//! The ordering protocol that makes lock-free reads safe: a report first
//! closes revisions (`end`, Release) and only then publishes the new horizon
//! (Release); a lookup loads the horizon (Acquire) *before* it reads `end`.
//! A reader that sees a horizon covering its view therefore also sees every
//! closing up to that horizon. `loom-tests` model-checks this.

use crate::error::CoreError;
use crate::eviction::{Member, SizeBound};
use crate::index::{Index, Slot, OPEN};
use crate::invalidation::{InvalidationLog, LogLock};
use crate::revision::{Oid, StateWeight, Tid};
use crate::rules::{closing, collapsing, plan_store, Closing, StorePlan};
pub use crate::rules::{CacheStats, Refusal, StoreOutcome};
use crate::sync::{AtomicU64 as SyncU64, Ordering};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// Bytes charged per cached revision on top of its state, for eviction
/// and for the `bytes` statistic: the skiplist node (key, slot, tower,
/// ~80 B), the `Arc` header (16 B) and moka's per-entry bookkeeping
/// (~150 B, measured by moka's authors and in docs/benchmarks.md).
pub const ENTRY_OVERHEAD: usize = 256;

/// Hits of the whole cache per tick of the sampled read bookkeeping (see
/// `SnapshotCache::lookup`).
const TOUCH_TICK: u64 = 1024;

/// A hit: the revision visible at the view asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit<S> {
    /// Tid that wrote the revision.
    pub serial: Tid,
    /// End of its validity, `None` while current.
    pub end: Option<Tid>,
    /// The state, shared and immutable (invariant 6).
    pub state: Arc<S>,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    stores: AtomicU64,
    refused: AtomicU64,
    invalidations: AtomicU64,
    reclaimed: AtomicU64,
    evicted: AtomicU64,
    bytes: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}
fn read(c: &AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

/// The MVCC snapshot cache. See the module documentation for the protocol.
///
/// `S` is the state type: raw pickles (`Vec<u8>`) in the sidecar; any
/// [`StateWeight`] type in-process.
pub struct SnapshotCache<S> {
    index: Arc<Index<S>>,
    bound: Member,
    /// Published horizon (`0` until the log starts).
    horizon: SyncU64,
    /// The writer lock and the invalidation log it guards (`None` until
    /// the first `start_log`).
    log: LogLock,
    counters: Arc<Counters>,
}

impl<S: StateWeight + Send + Sync + 'static> SnapshotCache<S> {
    /// An empty cache with a budget of its own of `capacity_bytes` (states
    /// plus [`ENTRY_OVERHEAD`] per revision). Its log is not started: open
    /// stores are refused until [`SnapshotCache::start_log`].
    pub fn new(capacity_bytes: u64) -> Self {
        Self::within(&SizeBound::new(capacity_bytes))
    }

    /// An empty cache that shares the byte budget `bound` with other caches.
    pub fn within(bound: &SizeBound) -> Self {
        let index = Arc::new(Index::new());
        let counters = Arc::new(Counters::default());
        let evict = {
            let (index, counters) = (index.clone(), counters.clone());
            Arc::new(move |oid, serial| {
                if let Some(w) = index.remove(oid, serial) {
                    counters
                        .bytes
                        .fetch_sub(u64::from(w), std::sync::atomic::Ordering::Relaxed);
                    bump(&counters.evicted, 1);
                }
            })
        };
        SnapshotCache {
            index,
            bound: bound.join(evict),
            horizon: SyncU64::new(0),
            log: LogLock::new(None),
            counters,
        }
    }

    /// The revision of `oid` visible at view `view`, or `None` (a miss).
    ///
    /// A hit `(serial, state)` is what `loadBefore(oid, view + 1)` of the
    /// base storage returns (invariant 1), given that stores and reports fed
    /// to this cache were true. Lock-free; never blocks on writers.
    pub fn lookup(&self, oid: Oid, view: Tid) -> Option<Hit<S>> {
        let horizon = self.horizon.load(Ordering::Acquire);
        let hit = self
            .index
            .floor(oid.0, view.0, |serial, slot| {
                let end = slot.end();
                let visible = if end == OPEN { view.0 <= horizon } else { view.0 < end };
                if !visible {
                    return None;
                }
                // The size bound learns of reads by sampling: a revision tells
                // it at most once per TOUCH_TICK hits of the whole cache.
                // TinyLFU needs relative frequencies, which sampling keeps.
                // Measured with `cargo bench -p tidecache-core --bench
                // snapshot`: a hit among 64 hot revisions costs 219 ns
                // sampled, 450 ns with TOUCH_TICK = 1 (moka told every time);
                // uniform access over 100,000 revisions is no slower.
                let tick = self.counters.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed) / TOUCH_TICK;
                if slot.touched.swap(tick, std::sync::atomic::Ordering::Relaxed) != tick {
                    self.bound.touch(oid.0, serial);
                }
                Some(Hit {
                    serial: Tid(serial),
                    end: (end != OPEN).then_some(Tid(end)),
                    state: slot.state.clone(),
                })
            })
            .flatten();
        if hit.is_none() {
            bump(&self.counters.misses, 1);
        }
        hit
    }

    /// The state and end (`None` while open) of the revision `(oid,
    /// serial)` if it is cached, whatever its validity; no counter moves.
    /// For a caller that already knows the serial visible at its view from
    /// the authority (the sidecar or the storage) and only needs the state:
    /// the in-process template cache of the Python adapter uses it to
    /// decode a revision once (invariant 6).
    pub fn get_exact(&self, oid: Oid, serial: Tid) -> Option<(Arc<S>, Option<Tid>)> {
        self.index.get(oid.0, serial.0, |slot| {
            let end = slot.end();
            (slot.state.clone(), (end != OPEN).then_some(Tid(end)))
        })
    }

    /// Stores the revision `(oid, serial)` loaded at view `view`.
    ///
    /// With `end = Some(t)` (from `loadBefore`) the revision is closed and
    /// kept as is: history does not change. With `end = None` it was current
    /// at `view` and is checked against the invalidation log (invariant 3):
    /// kept open if the log has no change of `oid` in `(view, H]`, closed at
    /// the first such change otherwise, refused if `view` is below the log's
    /// start or a newer revision of `oid` is cached.
    ///
    /// # Errors
    /// [`CoreError::BadStore`] if `end <= serial` or, for an open store,
    /// `view < serial`.
    pub fn store(
        &self,
        oid: Oid,
        serial: Tid,
        end: Option<Tid>,
        view: Tid,
        state: Arc<S>,
    ) -> Result<StoreOutcome, CoreError> {
        let log = self.log.lock();
        match plan_store(log.as_ref(), oid, serial, end, view, || {
            self.index.has_later(oid.0, serial.0)
        })? {
            StorePlan::Refuse(r) => {
                bump(&self.counters.refused, 1);
                Ok(StoreOutcome::Refused(r))
            }
            StorePlan::Insert(end) => {
                self.insert(oid, serial, end, state);
                Ok(if end == OPEN {
                    StoreOutcome::Open
                } else {
                    StoreOutcome::Closed(Tid(end))
                })
            }
        }
    }

    fn insert(&self, oid: Oid, serial: Tid, end: u64, state: Arc<S>) {
        bump(&self.counters.stores, 1);
        let known = self.index.get(oid.0, serial.0, |slot| {
            if end != OPEN && slot.end() == OPEN {
                slot.set_end(end);
            }
        });
        if known.is_some() {
            return;
        }
        let weight = u32::try_from(state.weight().saturating_add(ENTRY_OVERHEAD)).unwrap_or(u32::MAX);
        self.index
            .insert(oid.0, serial.0, Slot::new((end != OPEN).then_some(end), state, weight));
        bump(&self.counters.bytes, u64::from(weight));
        self.bound.record(oid.0, serial.0, weight);
    }

    /// Applies the invalidation report `(from, to, changes)`: closes the
    /// open revision each change ends, then publishes the new horizon, which
    /// it returns.
    ///
    /// # Errors
    /// As [`InvalidationLog::apply`]: [`CoreError::Gap`] when `from` is past
    /// the horizon (invariant 4), [`CoreError::BadReport`] for a malformed
    /// report. A report before the log started is a gap at horizon 0.
    pub fn report(&self, from: Tid, to: Tid, changes: &[(Oid, Tid)]) -> Result<Tid, CoreError> {
        let applied = self.log.apply(from, to, changes)?;
        for &(oid, tid) in &applied.changes {
            self.close(oid, tid);
        }
        bump(&self.counters.invalidations, changes.len() as u64);
        self.horizon.store(applied.horizon.0, Ordering::Release);
        Ok(applied.horizon)
    }

    /// Applies the collapsed report `(from, to, changes)` (see
    /// [`InvalidationLog::apply_collapsed`]): for each listed oid whose
    /// newest change `T` is past the prior horizon `H0`, its open revision
    /// is closed at `H0 + 1`, a closed one claiming validity past `T` is
    /// dropped ([`crate::rules::collapsing`]); then the new horizon is
    /// published, which it returns.
    ///
    /// # Errors
    /// As [`SnapshotCache::report`].
    pub fn report_collapsed(&self, from: Tid, to: Tid, changes: &[(Oid, Tid)]) -> Result<Tid, CoreError> {
        let (_log, applied) = self.log.apply_collapsed(from, to, changes)?;
        let prior = applied.prior;
        for &(oid, newest) in &applied.uncertain {
            // Revisions past the prior horizon cannot have been stored
            // (refused): drop any, then decide on the one visible at it.
            while let Some(serial) = self
                .index
                .floor(oid.0, applied.horizon.0, |serial, _| serial)
                .filter(|&s| s > prior.0)
            {
                self.remove(oid.0, serial);
            }
            let stale = self.index.floor(oid.0, prior.0, |serial, slot| {
                match collapsing(serial, slot.end(), prior, newest) {
                    Closing::Close => {
                        slot.set_end(prior.0 + 1);
                        None
                    }
                    Closing::Drop => Some(serial),
                    Closing::Keep => None,
                }
            });
            if let Some(Some(serial)) = stale {
                self.remove(oid.0, serial);
            }
        }
        bump(&self.counters.invalidations, changes.len() as u64);
        self.horizon.store(applied.horizon.0, Ordering::Release);
        Ok(applied.horizon)
    }

    /// `oid` changed at `tid`: the revision before it ends there.
    fn close(&self, oid: Oid, tid: Tid) {
        let Some(prev) = tid.0.checked_sub(1) else {
            return;
        };
        let stale = self
            .index
            .floor(oid.0, prev, |serial, slot| match closing(slot.end(), tid) {
                Closing::Close => {
                    slot.set_end(tid.0);
                    None
                }
                Closing::Drop => Some(serial),
                Closing::Keep => None,
            });
        if let Some(Some(serial)) = stale {
            self.remove(oid.0, serial);
        }
    }

    fn remove(&self, oid: u64, serial: u64) {
        if let Some(w) = self.index.remove(oid, serial) {
            self.counters
                .bytes
                .fetch_sub(u64::from(w), std::sync::atomic::Ordering::Relaxed);
        }
        self.bound.forget(oid, serial);
    }

    /// Starts (or restarts) the invalidation log at `at`: the horizon becomes
    /// `at`, and every open revision is dropped, since nothing is known of
    /// the changes that may have closed it. Closed revisions stay: history
    /// does not change. Used when the first client attaches and when a
    /// client lost invalidations (ZEO's `invalidateCache`, a gap).
    pub fn start_log(&self, at: Tid) {
        let mut log = self.log.lock();
        for (oid, serial) in self.index.select(|s| s.end() == OPEN) {
            self.remove(oid, serial);
        }
        *log = Some(InvalidationLog::starting_at(at));
        self.horizon.store(at.0, Ordering::Release);
    }

    /// Drops every revision and stops the log: history may have changed
    /// (a restored backup, invariant 7).
    pub fn flush(&self) {
        let mut log = self.log.lock();
        *log = None;
        self.horizon.store(0, Ordering::Release);
        for (oid, serial) in self.index.select(|_| true) {
            self.remove(oid, serial);
        }
    }

    /// Reclaims every revision with `end <= low_water` (invisible to every
    /// registered view, invariant 5) and truncates the log below
    /// `low_water`. Returns the number of revisions reclaimed. Their states
    /// are freed when the last `Arc` handed out is dropped; their index
    /// nodes when crossbeam-epoch sees no reader pinned before the removal.
    pub fn reclaim(&self, low_water: Tid) -> usize {
        let (_log, Some(low_water)) = self.log.truncate(low_water) else {
            return 0;
        };
        let dead = self.index.select(|s| {
            let end = s.end();
            end != OPEN && end <= low_water.0
        });
        for &(oid, serial) in &dead {
            self.remove(oid, serial);
        }
        bump(&self.counters.reclaimed, dead.len() as u64);
        dead.len()
    }

    /// Evicts one revision, as the size bound would (tests and tools).
    pub fn evict(&self, oid: Oid, serial: Tid) {
        let _log = self.log.lock();
        self.remove(oid.0, serial.0);
    }

    /// The horizon, or `None` before the log started.
    pub fn horizon(&self) -> Option<Tid> {
        self.log.horizon()
    }

    /// The log's start, or `None` before the log started.
    pub fn log_start(&self) -> Option<Tid> {
        self.log.log_start()
    }

    /// The `limit` open revisions with the highest serials, `(oid, serial)`,
    /// highest first (a scan of the index; always known).
    pub fn open_revisions(&self, limit: usize) -> Option<Vec<(Oid, Tid)>> {
        let mut open = self.index.select(|s| s.end() == OPEN);
        open.sort_unstable_by_key(|&(oid, serial)| std::cmp::Reverse((serial, oid)));
        open.truncate(limit);
        Some(open.into_iter().map(|(o, s)| (Oid(o), Tid(s))).collect())
    }

    /// The horizon and up to four oids changed at exactly it
    /// ([`InvalidationLog::witness`]), `None` before the log started.
    pub fn witness(&self) -> Option<(Tid, Vec<Oid>)> {
        self.log.witness()
    }

    /// Number of changes the log holds.
    pub fn log_len(&self) -> usize {
        self.log.len()
    }

    /// Runs the size bound's pending evictions now (they otherwise run
    /// during later inserts and lookups).
    pub fn run_pending_tasks(&self) {
        self.bound.run_pending_tasks();
    }

    /// Counters and sizes.
    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        CacheStats {
            entries: self.index.len() as u64,
            bytes: read(&c.bytes),
            capacity: self.bound.capacity(),
            hits: read(&c.hits),
            misses: read(&c.misses),
            stores: read(&c.stores),
            refused: read(&c.refused),
            invalidations: read(&c.invalidations),
            reclaimed: read(&c.reclaimed),
            evicted: read(&c.evicted),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn get_exact_finds_only_the_serial_asked_for_with_its_end() {
        let c: SnapshotCache<Vec<u8>> = SnapshotCache::new(1 << 20);
        c.start_log(Tid(10));
        assert_eq!(
            c.store(Oid(1), Tid(5), None, Tid(10), Arc::new(b"a".to_vec())).unwrap(),
            StoreOutcome::Open
        );
        c.store(Oid(1), Tid(2), Some(Tid(5)), Tid(3), Arc::new(b"b".to_vec()))
            .unwrap();
        let (s, end) = c.get_exact(Oid(1), Tid(5)).unwrap();
        assert_eq!((&s[..], end), (&b"a"[..], None));
        let (s, end) = c.get_exact(Oid(1), Tid(2)).unwrap();
        assert_eq!((&s[..], end), (&b"b"[..], Some(Tid(5))));
        assert!(c.get_exact(Oid(1), Tid(4)).is_none());
        assert!(c.get_exact(Oid(2), Tid(5)).is_none());
        let before = c.stats();
        c.get_exact(Oid(1), Tid(5));
        assert_eq!(c.stats(), before, "no counter moves");
    }
}
