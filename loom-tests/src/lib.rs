//! Loom models of tidecache's concurrent protocols; see `tests/`.
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p tidecache-loom-tests`
//! (`make test-loom`).
