//! The view registry: one view per open ZODB connection, and the low-water
//! mark `L`, the oldest view still registered (invariant 5).

use crate::error::CoreError;
use crate::revision::Tid;
use crate::sync::{lock, AtomicU64, Mutex, Ordering};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Identifies a registered view within one [`ViewRegistry`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ViewId(pub u64);

const NONE: u64 = u64::MAX;

#[derive(Default)]
struct Views {
    next_id: u64,
    by_id: HashMap<ViewId, Tid>,
    counts: BTreeMap<Tid, usize>,
}

impl Views {
    fn add(&mut self, tid: Tid) {
        *self.counts.entry(tid).or_default() += 1;
    }
    fn remove(&mut self, tid: Tid) {
        if let Some(n) = self.counts.get_mut(&tid) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&tid);
            }
        }
    }
    fn low_water(&self) -> u64 {
        self.counts.keys().next().map_or(NONE, |t| t.0)
    }
}

/// Registered views and their low-water mark.
///
/// Writers take a short lock; the low-water mark is published in an atomic
/// under that lock, so [`ViewRegistry::low_water_mark`] is a single load and
/// never exceeds the tid of a view whose registration has returned (the
/// property the loom model in `loom-tests` checks).
pub struct ViewRegistry {
    views: Mutex<Views>,
    low_water: AtomicU64,
}

impl Default for ViewRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl ViewRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        ViewRegistry {
            views: Mutex::new(Views::default()),
            low_water: AtomicU64::new(NONE),
        }
    }

    /// Registers a view at tid `at` (ZODB's `_start - 1`) and returns its id.
    pub fn register(&self, at: Tid) -> ViewId {
        let mut v = lock(&self.views);
        v.next_id += 1;
        let id = ViewId(v.next_id);
        v.by_id.insert(id, at);
        v.add(at);
        self.low_water.store(v.low_water(), Ordering::Release);
        id
    }

    /// Moves view `id` to tid `to` (at each new transaction of its
    /// connection).
    ///
    /// # Errors
    /// [`CoreError::UnknownView`] if `id` is not registered.
    pub fn advance(&self, id: ViewId, to: Tid) -> Result<(), CoreError> {
        let mut v = lock(&self.views);
        let old = v
            .by_id
            .get_mut(&id)
            .map(|t| std::mem::replace(t, to))
            .ok_or(CoreError::UnknownView(id))?;
        v.remove(old);
        v.add(to);
        self.low_water.store(v.low_water(), Ordering::Release);
        Ok(())
    }

    /// Releases view `id` (its connection went back to the pool or closed)
    /// and returns the tid it was at.
    ///
    /// # Errors
    /// [`CoreError::UnknownView`] if `id` is not registered.
    pub fn release(&self, id: ViewId) -> Result<Tid, CoreError> {
        let mut v = lock(&self.views);
        let old = v.by_id.remove(&id).ok_or(CoreError::UnknownView(id))?;
        v.remove(old);
        self.low_water.store(v.low_water(), Ordering::Release);
        Ok(old)
    }

    /// Unregisters the oldest view (a view that holds the low-water mark
    /// back too long, invariant 5) and returns it with its tid.
    pub fn detach_oldest(&self) -> Option<(ViewId, Tid)> {
        let mut v = lock(&self.views);
        let (&id, &tid) = v.by_id.iter().min_by_key(|(id, tid)| (**tid, **id))?;
        v.by_id.remove(&id);
        v.remove(tid);
        self.low_water.store(v.low_water(), Ordering::Release);
        Some((id, tid))
    }

    /// The oldest registered view, or `None` when no view is registered.
    pub fn low_water_mark(&self) -> Option<Tid> {
        match self.low_water.load(Ordering::Acquire) {
            NONE => None,
            t => Some(Tid(t)),
        }
    }

    /// Number of registered views.
    pub fn len(&self) -> usize {
        lock(&self.views).by_id.len()
    }

    /// Whether no view is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn low_water_mark_follows_the_oldest_view() {
        let r = ViewRegistry::new();
        assert_eq!(r.low_water_mark(), None);
        let a = r.register(Tid(5));
        let b = r.register(Tid(3));
        let c = r.register(Tid(3));
        assert_eq!(r.low_water_mark(), Some(Tid(3)));
        r.release(b).unwrap();
        assert_eq!(r.low_water_mark(), Some(Tid(3)), "c still holds 3");
        r.advance(c, Tid(9)).unwrap();
        assert_eq!(r.low_water_mark(), Some(Tid(5)));
        r.release(a).unwrap();
        assert_eq!(r.low_water_mark(), Some(Tid(9)));
        assert_eq!(r.release(a), Err(CoreError::UnknownView(a)));
        assert_eq!(r.advance(a, Tid(1)), Err(CoreError::UnknownView(a)));
        r.release(c).unwrap();
        assert_eq!(r.low_water_mark(), None);
        assert!(r.is_empty());
    }

    #[test]
    fn detaching_takes_the_oldest_view() {
        let r = ViewRegistry::new();
        let a = r.register(Tid(5));
        let b = r.register(Tid(3));
        assert_eq!(r.detach_oldest(), Some((b, Tid(3))));
        assert_eq!(r.low_water_mark(), Some(Tid(5)));
        assert_eq!(r.release(b), Err(CoreError::UnknownView(b)));
        assert_eq!(r.detach_oldest(), Some((a, Tid(5))));
        assert_eq!(r.detach_oldest(), None);
    }
}
