//! A client process's views of one database, kept in the process: the
//! sidecar only needs the oldest of them (invariant 5: reclaim only what no
//! registered view sees), so a client registers one remote view per
//! database, at this minimum, and moves it only when the minimum changes.
//!
//! Opening, moving and closing a view ([`ProcessViews::register`],
//! [`ProcessViews::advance`], [`ProcessViews::release`]) take an
//! uncontended mutex over a counted multiset of tids and cost no system
//! call. The background sender reads the minimum with
//! [`ProcessViews::take`] and publishes it to the sidecar.
//!
//! When to wake the sender: a minimum that went *down* (a view older than
//! the one published, or a first view while none is published) must reach
//! the sidecar before it reclaims what that view sees; the first change
//! that makes it so sets the `dirty` flag and only that change returns
//! [`Change::Wake`] (the caller wakes the sender, one system call). A
//! minimum that went *up* (the oldest view moved or closed) is safe to
//! publish late (it only holds memory a little longer): it returns
//! [`Change::Quiet`] and the sender picks it up on its next wake or tick.
//! So the steady state of a process whose connections move to the newest
//! tid costs no system call at all.
//!
//! The sender clears `dirty` *before* it reads the minimum (under the
//! mutex), so a decrease made after its read sets the flag again and wakes
//! it: no update is lost (model-checked in `loom-tests/tests/process_views.rs`).

use crate::sync::{lock, AtomicBool, AtomicU64, Mutex, Ordering};
use std::collections::{BTreeMap, HashMap};

/// What a change to the views asks of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Change {
    /// The minimum went below the published one and nobody has woken the
    /// sender for it yet: wake it.
    Wake,
    /// Nothing to do now (the sender publishes on its next wake or tick).
    Quiet,
}

#[derive(Default)]
struct Inner {
    /// Local view id -> its tid.
    views: HashMap<u64, u64>,
    /// tid -> how many views are at it (a counted multiset).
    counts: BTreeMap<u64, u32>,
    /// The minimum the sender last took (`None`: no view published).
    published: Option<u64>,
}

impl Inner {
    fn minimum(&self) -> Option<u64> {
        self.counts.keys().next().copied()
    }

    fn add(&mut self, tid: u64) {
        *self.counts.entry(tid).or_insert(0) += 1;
    }

    fn remove(&mut self, tid: u64) {
        if let Some(n) = self.counts.get_mut(&tid) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&tid);
            }
        }
    }

    /// Whether the minimum is below the published one (`None` is above
    /// every tid).
    fn went_down(&self) -> bool {
        match (self.minimum(), self.published) {
            (Some(m), Some(p)) => m < p,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

/// One process's views of one database: a counted multiset of tids under
/// an uncontended mutex, and a `dirty` flag for the sender. Thread-safe.
pub struct ProcessViews {
    inner: Mutex<Inner>,
    dirty: AtomicBool,
    /// The last view id handed out (ids are never reused, and a child of a
    /// fork continues after its parent's).
    next_id: AtomicU64,
}

impl Default for ProcessViews {
    fn default() -> Self {
        Self::starting_after(0)
    }
}

impl ProcessViews {
    /// No views; ids start after `last_id` (a forked child passes its
    /// parent's [`ProcessViews::last_id`], so an id the parent handed out
    /// never names one of the child's views).
    pub fn starting_after(last_id: u64) -> Self {
        ProcessViews {
            inner: Mutex::new(Inner::default()),
            dirty: AtomicBool::new(false),
            next_id: AtomicU64::new(last_id),
        }
    }

    /// The last id handed out (one atomic load, no lock).
    pub fn last_id(&self) -> u64 {
        self.next_id.load(Ordering::Acquire)
    }

    /// Marks the sender wanted if the minimum went down; see [`Change`].
    fn after_change(&self, inner: &Inner) -> Change {
        if inner.went_down() && !self.dirty.swap(true, Ordering::AcqRel) {
            Change::Wake
        } else {
            Change::Quiet
        }
    }

    /// Opens a view at `tid`; returns its id and what to do.
    pub fn register(&self, tid: u64) -> (u64, Change) {
        let id = self.next_id.fetch_add(1, Ordering::AcqRel) + 1;
        let mut inner = lock(&self.inner);
        inner.views.insert(id, tid);
        inner.add(tid);
        (id, self.after_change(&inner))
    }

    /// Moves view `id` to `tid` (an unknown id is ignored: `Quiet`).
    pub fn advance(&self, id: u64, tid: u64) -> Change {
        let mut inner = lock(&self.inner);
        let Some(old) = inner.views.insert(id, tid) else {
            inner.views.remove(&id);
            return Change::Quiet;
        };
        if old != tid {
            inner.remove(old);
            inner.add(tid);
        }
        self.after_change(&inner)
    }

    /// Closes view `id` (an unknown id is ignored). A minimum only goes up
    /// when a view closes, so this never asks for a wake.
    pub fn release(&self, id: u64) {
        let mut inner = lock(&self.inner);
        if let Some(old) = inner.views.remove(&id) {
            inner.remove(old);
        }
    }

    /// The sender's read: clears `dirty`, then takes the minimum (the one
    /// to publish; `None`: no view) and remembers it as published.
    pub fn take(&self) -> Option<u64> {
        self.take_keeping(false).0
    }

    /// [`ProcessViews::take`], except that with `keep` a process with no
    /// open view keeps what was published (the sender keeps its remote
    /// view a while instead of releasing it, so a process whose only
    /// connection opens and closes at every request does not release and
    /// register again each time, nor wake the sender for it: the next view
    /// is not below the kept one). Returns the minimum to publish and
    /// whether no view is open.
    pub fn take_keeping(&self, keep: bool) -> (Option<u64>, bool) {
        self.dirty.store(false, Ordering::Release);
        let mut inner = lock(&self.inner);
        let minimum = inner.minimum();
        if minimum.is_some() || !keep {
            inner.published = minimum;
        }
        (inner.published, minimum.is_none())
    }

    /// Whether a decrease waits for the sender.
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// The minimum the sender last took.
    pub fn published(&self) -> Option<u64> {
        lock(&self.inner).published
    }

    /// The oldest open view now (`None`: none).
    pub fn minimum(&self) -> Option<u64> {
        lock(&self.inner).minimum()
    }

    /// How many views are open.
    pub fn len(&self) -> usize {
        lock(&self.inner).views.len()
    }

    /// Whether no view is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn only_a_decrease_wakes_and_only_once() {
        let v = ProcessViews::default();
        let (a, c) = v.register(10);
        assert_eq!(c, Change::Wake, "a first view while none is published");
        let (_b, c) = v.register(5);
        assert_eq!(c, Change::Quiet, "already dirty: the sender is woken");
        assert_eq!(v.take(), Some(5));
        assert_eq!(v.advance(a, 12), Change::Quiet, "not the minimum");
        let (c_id, c) = v.register(3);
        assert_eq!(c, Change::Wake);
        assert_eq!(v.take(), Some(3));
        v.release(c_id);
        assert!(!v.is_dirty(), "an increase does not wake");
        assert_eq!(v.minimum(), Some(5));
        assert_eq!(v.take(), Some(5));
        assert_eq!(v.advance(999, 1), Change::Quiet, "unknown id ignored");
        assert_eq!(v.minimum(), Some(5));
    }

    #[test]
    fn a_kept_view_is_not_released_and_the_next_one_does_not_wake() {
        let v = ProcessViews::default();
        let (a, _) = v.register(7);
        assert_eq!(v.take(), Some(7));
        v.release(a);
        assert_eq!(v.take_keeping(true), (Some(7), true), "kept while no view is open");
        let (b, change) = v.register(7);
        assert_eq!(change, Change::Quiet, "not below the kept view: no wake");
        v.release(b);
        assert_eq!(v.take_keeping(false), (None, true), "released once the linger is over");
        let (_, change) = v.register(8);
        assert_eq!(change, Change::Wake);
    }

    #[test]
    fn a_fork_child_continues_the_ids() {
        let parent = ProcessViews::default();
        let (a, _) = parent.register(1);
        let child = ProcessViews::starting_after(parent.last_id());
        let (b, _) = child.register(1);
        assert!(b > a);
        child.release(a);
        assert_eq!(child.len(), 1);
    }
}
