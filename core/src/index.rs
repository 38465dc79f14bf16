//! The revision index: `(oid, serial) -> slot`, ordered so that the revision
//! visible at a view is found with one floor search.
//!
//! In production it is a `crossbeam_skiplist::SkipMap`: lock-free for
//! readers, with removed nodes reclaimed by crossbeam-epoch once no reader
//! holds them. Under `cfg(loom)` it is a mutex-guarded `BTreeMap`, so the
//! slot protocol around it (end words, horizon) is model-checked unchanged.

use crate::sync::{AtomicU64, Ordering};
use std::sync::Arc;

/// `end` word of a slot whose revision is open (current).
pub(crate) use crate::rules::OPEN;

/// One cached revision: its state and the end of its validity interval.
pub(crate) struct Slot<S> {
    /// `end` tid, or [`OPEN`]. Written only under the cache's writer lock,
    /// always before the horizon that makes the closing visible (Release);
    /// read by lookups after loading the horizon (Acquire).
    pub(crate) end: AtomicU64,
    pub(crate) state: Arc<S>,
    pub(crate) weight: u32,
    /// The hit tick at which this revision last told the size bound it was
    /// read (see `SnapshotCache::lookup`). Statistics only: not part of
    /// the visibility protocol.
    pub(crate) touched: std::sync::atomic::AtomicU64,
}

impl<S> Slot<S> {
    pub(crate) fn new(end: Option<u64>, state: Arc<S>, weight: u32) -> Self {
        Slot {
            end: AtomicU64::new(end.unwrap_or(OPEN)),
            state,
            weight,
            touched: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }
    pub(crate) fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }
    pub(crate) fn set_end(&self, end: u64) {
        self.end.store(end, Ordering::Release)
    }
}

type Key = (u64, u64);

#[cfg(not(loom))]
pub(crate) struct Index<S> {
    map: crossbeam_skiplist::SkipMap<Key, Slot<S>>,
}

#[cfg(not(loom))]
impl<S: Send + Sync + 'static> Index<S> {
    pub(crate) fn new() -> Self {
        Index {
            map: crossbeam_skiplist::SkipMap::new(),
        }
    }

    /// Calls `f` with the revision of `oid` with the greatest serial `<= view`.
    pub(crate) fn floor<R>(&self, oid: u64, view: u64, f: impl FnOnce(u64, &Slot<S>) -> R) -> Option<R> {
        let e = self.map.upper_bound(std::ops::Bound::Included(&(oid, view)))?;
        (e.key().0 == oid).then(|| f(e.key().1, e.value()))
    }

    pub(crate) fn get<R>(&self, oid: u64, serial: u64, f: impl FnOnce(&Slot<S>) -> R) -> Option<R> {
        self.map.get(&(oid, serial)).map(|e| f(e.value()))
    }

    /// Whether a revision of `oid` newer than `serial` is indexed.
    pub(crate) fn has_later(&self, oid: u64, serial: u64) -> bool {
        use std::ops::Bound::{Excluded, Included};
        self.map
            .range((Excluded((oid, serial)), Included((oid, u64::MAX))))
            .next()
            .is_some()
    }

    pub(crate) fn insert(&self, oid: u64, serial: u64, slot: Slot<S>) {
        self.map.insert((oid, serial), slot);
    }

    /// Removes the revision; returns its weight if it was indexed.
    pub(crate) fn remove(&self, oid: u64, serial: u64) -> Option<u32> {
        self.map.remove(&(oid, serial)).map(|e| e.value().weight)
    }

    /// Keys of every revision for which `pred` holds.
    pub(crate) fn select(&self, mut pred: impl FnMut(&Slot<S>) -> bool) -> Vec<Key> {
        self.map.iter().filter(|e| pred(e.value())).map(|e| *e.key()).collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(loom)]
pub(crate) struct Index<S> {
    map: crate::sync::Mutex<std::collections::BTreeMap<Key, Arc<Slot<S>>>>,
}

#[cfg(loom)]
impl<S: Send + Sync + 'static> Index<S> {
    pub(crate) fn new() -> Self {
        Index {
            map: crate::sync::Mutex::new(Default::default()),
        }
    }

    fn slot_floor(&self, oid: u64, view: u64) -> Option<(u64, Arc<Slot<S>>)> {
        let m = crate::sync::lock(&self.map);
        let (k, v) = m.range(..=(oid, view)).next_back()?;
        (k.0 == oid).then(|| (k.1, v.clone()))
    }

    pub(crate) fn floor<R>(&self, oid: u64, view: u64, f: impl FnOnce(u64, &Slot<S>) -> R) -> Option<R> {
        // The slot is read outside the map's lock, as the skiplist's is.
        let (serial, slot) = self.slot_floor(oid, view)?;
        Some(f(serial, &slot))
    }

    pub(crate) fn get<R>(&self, oid: u64, serial: u64, f: impl FnOnce(&Slot<S>) -> R) -> Option<R> {
        let slot = crate::sync::lock(&self.map).get(&(oid, serial)).cloned()?;
        Some(f(&slot))
    }

    pub(crate) fn has_later(&self, oid: u64, serial: u64) -> bool {
        crate::sync::lock(&self.map)
            .range((oid, serial + 1)..=(oid, u64::MAX))
            .next()
            .is_some()
    }

    pub(crate) fn insert(&self, oid: u64, serial: u64, slot: Slot<S>) {
        crate::sync::lock(&self.map).insert((oid, serial), Arc::new(slot));
    }

    pub(crate) fn remove(&self, oid: u64, serial: u64) -> Option<u32> {
        crate::sync::lock(&self.map).remove(&(oid, serial)).map(|s| s.weight)
    }

    pub(crate) fn select(&self, mut pred: impl FnMut(&Slot<S>) -> bool) -> Vec<Key> {
        crate::sync::lock(&self.map)
            .iter()
            .filter(|(_, v)| pred(v))
            .map(|(k, _)| *k)
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        crate::sync::lock(&self.map).len()
    }
}
