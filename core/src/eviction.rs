//! The size bound: one byte budget shared by every cache that joins it
//! (all databases of a sidecar share `--memory-mb`).
//!
//! The policy is moka's (TinyLFU admission, LRU eviction, weighted by
//! bytes). moka holds only `(member, oid, serial) -> weight`; the states
//! live in each cache's index, and moka's eviction listener removes them
//! there. moka's per-entry cost (~150 B) is why [`crate::ENTRY_OVERHEAD`]
//! is charged per revision.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

type Evictor = Arc<dyn Fn(u64, u64) + Send + Sync>;
type Members = Arc<RwLock<HashMap<u32, Evictor>>>;

/// A byte budget shared by caches. Cheap to clone (a handle).
#[derive(Clone)]
pub struct SizeBound {
    #[cfg(not(loom))]
    policy: moka::sync::Cache<(u32, u64, u64), u32>,
    members: Members,
    next: Arc<AtomicU32>,
    capacity: u64,
}

impl SizeBound {
    /// A budget of `capacity_bytes` (states plus per-revision overhead).
    pub fn new(capacity_bytes: u64) -> Self {
        let members: Members = Arc::default();
        #[cfg(not(loom))]
        let policy = {
            let members = members.clone();
            moka::sync::Cache::builder()
                .max_capacity(capacity_bytes)
                .weigher(|_k, w: &u32| *w)
                .eviction_listener(move |k: Arc<(u32, u64, u64)>, _w, cause| {
                    if cause.was_evicted() {
                        let evict = members.read().ok().and_then(|m| m.get(&k.0).cloned());
                        if let Some(evict) = evict {
                            evict(k.1, k.2);
                        }
                    }
                })
                .build()
        };
        SizeBound {
            #[cfg(not(loom))]
            policy,
            members,
            next: Arc::new(AtomicU32::new(0)),
            capacity: capacity_bytes,
        }
    }

    /// The budget, bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub(crate) fn join(&self, evict: Evictor) -> Member {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.members.write() {
            m.insert(id, evict);
        }
        Member {
            id,
            bound: self.clone(),
        }
    }
}

/// One cache's membership in a [`SizeBound`].
pub(crate) struct Member {
    id: u32,
    bound: SizeBound,
}

#[cfg_attr(loom, allow(unused_variables))]
impl Member {
    pub(crate) fn record(&self, oid: u64, serial: u64, weight: u32) {
        #[cfg(not(loom))]
        self.bound.policy.insert((self.id, oid, serial), weight);
    }
    pub(crate) fn touch(&self, oid: u64, serial: u64) {
        #[cfg(not(loom))]
        self.bound.policy.get(&(self.id, oid, serial));
    }
    pub(crate) fn forget(&self, oid: u64, serial: u64) {
        #[cfg(not(loom))]
        self.bound.policy.invalidate(&(self.id, oid, serial));
    }
    pub(crate) fn run_pending_tasks(&self) {
        #[cfg(not(loom))]
        self.bound.policy.run_pending_tasks();
    }
    pub(crate) fn capacity(&self) -> u64 {
        self.bound.capacity
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Ok(mut m) = self.bound.members.write() {
            m.remove(&self.id);
        }
    }
}
