//! The loom switch, as tokio does it: under `cfg(loom)` the atomics and locks
//! used by tidecache's concurrent protocols are loom's model-checked ones;
//! otherwise they are std's. Code in this crate imports them from here so the
//! same code is model-checked and shipped.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::Mutex;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::Mutex;

/// Locks `m`, treating a poisoned lock as still usable: every critical
/// section in this crate leaves its data consistent before anything in it
/// can panic, so a panic elsewhere must not take the cache down.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(loom)]
pub(crate) use loom::sync::MutexGuard;
#[cfg(not(loom))]
pub(crate) use std::sync::MutexGuard;
