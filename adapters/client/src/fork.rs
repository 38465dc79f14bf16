//! Which process a piece of client state belongs to.
//!
//! A process forked while another of its threads is inside a client call (a
//! catch-up or ZEO thread mid-report in a gunicorn `--preload` master) copies
//! that call's locks *locked*, and the thread that would unlock them does not
//! exist in the child. So per-process state (the connection, its lock, the
//! outbox, the hit batch) is tagged with the [`process`] that created
//! it; a call that finds another process's state installs a fresh one and
//! never touches the inherited locks.
//!
//! [`process`] is the process id, cached: a `pthread_atfork` child handler,
//! registered once by [`register`] (every `Client` and `Session` calls it
//! when constructed, so before any fork that copies them), stores the
//! child's id. Reading it costs one atomic load, no system call. Until the
//! handler is registered, or if it cannot be, `getpid` answers (the same
//! value: the tag never changes within a process).

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};

/// The process id while the handler keeps it; 0 until then.
static PID: AtomicU32 = AtomicU32::new(0);
/// 0: not registered, 1: being registered, 2: done. Not a `Once`: a child
/// forked while a thread registers must not wait for it.
static REGISTER: AtomicU8 = AtomicU8::new(0);

extern "C" fn after_fork_in_child() {
    // Async-signal-safe: getpid and an atomic store.
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    PID.store(pid as u32, Ordering::Release);
}

/// Registers the child handler (once per process image; a forked child
/// inherits it).
pub(crate) fn register() {
    if REGISTER
        .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    // SAFETY: registers a handler that only calls getpid and stores an atomic.
    let r = unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
    if r == 0 {
        PID.store(std::process::id(), Ordering::Release);
    } else {
        tracing::warn!(
            error = r,
            "pthread_atfork failed: forks are detected with one getpid per call"
        );
    }
    REGISTER.store(2, Ordering::Release);
}

/// The id of the calling process.
pub(crate) fn process() -> u32 {
    match PID.load(Ordering::Acquire) {
        0 => std::process::id(),
        pid => pid,
    }
}
