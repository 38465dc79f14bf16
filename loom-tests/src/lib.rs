//! Loom models of tidecache's concurrent protocols; see `tests/`.
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p tidecache-loom-tests`
//! (`make test-loom`).

/// Preemptions explored when `LOOM_MAX_PREEMPTIONS` is not set: enough for
/// the races modelled here, bounded so a run stays short.
pub const DEFAULT_PREEMPTIONS: usize = 2;

/// Model-checks `f` with loom: `LOOM_MAX_PREEMPTIONS` (read by loom's
/// `Builder`) bounds the preemptions, [`DEFAULT_PREEMPTIONS`] when unset.
#[cfg(loom)]
pub fn check<F>(f: F)
where
    F: Fn() + Sync + Send + 'static,
{
    let mut b = loom::model::Builder::new();
    b.preemption_bound.get_or_insert(DEFAULT_PREEMPTIONS);
    b.check(f);
}
