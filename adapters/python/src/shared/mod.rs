//! Shared unpickled state (issue 10, persistent issue #93): the connections
//! of one process activate their objects from one immutable template per
//! `(oid, serial)`, copy-on-write.
//!
//! - [`template`]: a record decoded once, references kept symbolic.
//! - [`materialise`]: a connection's state built from a template.
//! - [`TemplateCache`]: the per-process, per-database cache of templates:
//!   core's [`SnapshotCache`] (Arc-shared, epoch-reclaimed, the MVCC rules
//!   of the sidecar), fed the very invalidation reports the process sends
//!   to the sidecar (the binding's `Client.report`, `report_collapsed`,
//!   `resync` and `flush` apply them here first, in the caller's order).
//! - [`setstate`]: the native `Connection.setstate`.
//!
//! Two ways to find a template:
//!
//! - **MVCC mode** (the connection's storage is a tidecache instance,
//!   `_tc_mvcc` true): the template of the revision visible at the
//!   connection's view (`_tc_shared_view()`), with no storage load at all.
//!   On a miss the instance loads the revision (`_tc_load_revision`: the
//!   sidecar's arena, else the base storage) with its validity, and the
//!   template is stored against the log (invariant 3). Open revisions are
//!   visible only up to the template log's horizon (invariant 2): a view
//!   past it misses, never guesses.
//! - **Exact mode** (any other storage): the storage's `load` gives the
//!   serial; the template of exactly `(oid, serial)` is used, kept in a
//!   second cache that is only ever read by serial (never at a view). MVCC
//!   mode keeps a template there too when the log refuses it (no log yet,
//!   a serial past the horizon while the process is not joined to the
//!   sidecar): later activations then pay the load, not the decoding.
//!
//! Everything runs with the GIL held: templates are immutable once
//! published, so any number of threads or greenlets materialise from one
//! at once; no call blocks on I/O except the storage's own load on a miss.

pub(crate) mod materialise;
pub(crate) mod template;

use materialise::{Resolver, UNSAFE_SHARE};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use template::{decode, Globals, Reason, Template};
use tidecache_core::{CoreError, Oid, SnapshotCache, StoreOutcome, Tid};

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The templates of one database in one process, and its counters.
pub(crate) struct TemplateCache {
    /// Templates with their validity, looked up at views (MVCC mode).
    cache: SnapshotCache<Template>,
    /// Templates by exactly `(oid, serial)`, for a caller that learnt the
    /// serial from its storage (exact mode, and MVCC stores the log
    /// refuses): never looked up at a view, so its log never starts and
    /// every entry is kept as `[serial, serial + 1)`. Shares the byte
    /// budget with `cache`.
    exact: SnapshotCache<Template>,
    activations: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    decoded: AtomicU64,
    no_view: AtomicU64,
    log_restarts: AtomicU64,
    fallbacks: [AtomicU64; Reason::ALL.len()],
    /// Whether a revision is decoded at its first activation in the
    /// process (else at its second: the doorkeeper).
    decode_first: bool,
    /// Activations that were a revision's first in this process (ZODB's
    /// own path, not decoded).
    first_reads: AtomicU64,
    /// Hashes of the revisions activated once (lossy: a collision only
    /// decodes a revision at its first activation, or at its third).
    doorkeeper: Box<[AtomicU64]>,
    /// When reclamation last ran, milliseconds since `born`.
    reclaimed_at: AtomicU64,
    born: std::time::Instant,
}

/// Slots of the doorkeeper (8 bytes each).
const DOORKEEPER_SLOTS: usize = 1 << 16;

/// Reclamation scans every template, so it runs at most this often (ms);
/// between runs the size bound alone limits memory.
const RECLAIM_EVERY_MS: u64 = 1000;

impl TemplateCache {
    /// An empty cache bounded to `capacity_bytes` (templates' estimated
    /// bytes plus core's per-revision overhead). Its log starts at the
    /// first report, or at [`TemplateCache::start_log`].
    pub(crate) fn new(capacity_bytes: u64, decode_first: bool) -> Self {
        let bound = tidecache_core::SizeBound::new(capacity_bytes);
        TemplateCache {
            cache: SnapshotCache::within(&bound),
            exact: SnapshotCache::within(&bound),
            activations: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            decoded: AtomicU64::new(0),
            no_view: AtomicU64::new(0),
            log_restarts: AtomicU64::new(0),
            fallbacks: Default::default(),
            decode_first,
            first_reads: AtomicU64::new(0),
            doorkeeper: (0..DOORKEEPER_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            reclaimed_at: AtomicU64::new(0),
            born: std::time::Instant::now(),
        }
    }

    /// Applies an exact report of `(from, to]`. A report that does not
    /// follow the log (a gap: the process reported nothing here for a
    /// while, e.g. while it was not joined to the sidecar) restarts the log
    /// at `to`, which drops every open template; a malformed one flushes.
    pub(crate) fn report(&self, from: u64, to: u64, changes: &[(u64, u64)], low_water: Option<u64>) {
        let changes: Vec<(Oid, Tid)> = changes.iter().map(|&(o, t)| (Oid(o), Tid(t))).collect();
        let r = self.cache.report(Tid(from), Tid(to), &changes);
        self.after(r, to, low_water);
    }

    /// Applies a collapsed report (see `SnapshotCache::report_collapsed`);
    /// a gap or a malformed report as [`TemplateCache::report`].
    pub(crate) fn report_collapsed(&self, from: u64, to: u64, changes: &[(u64, u64)], low_water: Option<u64>) {
        let changes: Vec<(Oid, Tid)> = changes.iter().map(|&(o, t)| (Oid(o), Tid(t))).collect();
        let r = self.cache.report_collapsed(Tid(from), Tid(to), &changes);
        self.after(r, to, low_water);
    }

    fn after(&self, r: Result<Tid, CoreError>, to: u64, low_water: Option<u64>) {
        match r {
            Ok(horizon) => {
                // What no open connection of the process can see goes, and
                // the log below it (invariant 5). With no connection open,
                // the horizon bounds every later view but a lagging one,
                // which then only misses: reclaiming removes, never serves.
                let now = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
                let last = self.reclaimed_at.load(Ordering::Relaxed);
                if now.saturating_sub(last) >= RECLAIM_EVERY_MS
                    && self
                        .reclaimed_at
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    self.cache.reclaim(Tid(low_water.unwrap_or(horizon.0)));
                }
            }
            Err(CoreError::Gap { .. }) => {
                bump(&self.log_restarts);
                self.cache.start_log(Tid(to));
            }
            Err(_) => {
                bump(&self.log_restarts);
                self.cache.flush();
                self.exact.flush();
                self.cache.start_log(Tid(to));
            }
        }
    }

    /// Invalidations up to `tid` were lost, or the history may have
    /// changed under the process (a reconnect to a restored server): every
    /// template is dropped, closed ones too, and the log restarts at `tid`.
    pub(crate) fn resync(&self, tid: u64) {
        bump(&self.log_restarts);
        self.cache.flush();
        self.exact.flush();
        self.cache.start_log(Tid(tid));
    }

    /// The history changed (a failed proof, a pack, a restore): drops
    /// every template and stops the log until the next report.
    pub(crate) fn flush(&self) {
        self.cache.flush();
        self.exact.flush();
    }

    /// Starts the log at `at`: every change after `at` will be reported.
    pub(crate) fn start_log(&self, at: u64) {
        self.cache.start_log(Tid(at));
    }

    fn fallback(&self, reason: Reason) {
        bump(&self.fallbacks[reason.index()]);
    }

    /// Whether `(oid, serial)` was activated before in this process (its
    /// first activation goes ZODB's way; the second decodes): records it
    /// otherwise. The admission filter of TinyLFU's "doorkeeper", so that
    /// revisions read once (a cold read, a read after another process's
    /// write) never pay the decoding.
    fn seen_before(&self, oid: u64, serial: u64) -> bool {
        let h = (oid ^ serial.rotate_left(32))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(17)
            | 1;
        let slot = &self.doorkeeper[(h as usize) & (DOORKEEPER_SLOTS - 1)];
        slot.swap(h, Ordering::Relaxed) == h
    }

    /// The template of exactly `(oid, serial)`, if held, and whether it is
    /// held only by serial (not yet with a validity).
    fn get_exact(&self, oid: u64, serial: u64) -> Option<(Arc<Template>, bool)> {
        let (o, s) = (Oid(oid), Tid(serial));
        if let Some((tpl, _)) = self.cache.get_exact(o, s) {
            return Some((tpl, false));
        }
        self.exact.get_exact(o, s).map(|(tpl, _)| (tpl, true))
    }

    /// Keeps `tpl` as `(oid, serial)`: with its validity (`end`, `None`
    /// when current at `view`) when a view is given and the log accepts it
    /// (invariant 3), else by serial only.
    fn keep(&self, oid: u64, serial: u64, end: Option<u64>, view: Option<u64>, tpl: &Arc<Template>) {
        self.keep_unbounded(oid, serial, end, view, tpl);
        // moka applies the bound in batches; with few, large templates the
        // batch may wait too long: apply it now once over the budget.
        let (c, e) = (self.cache.stats(), self.exact.stats());
        if c.bytes + e.bytes > c.capacity {
            self.cache.run_pending_tasks();
        }
    }

    fn keep_unbounded(&self, oid: u64, serial: u64, end: Option<u64>, view: Option<u64>, tpl: &Arc<Template>) {
        let (o, s) = (Oid(oid), Tid(serial));
        if let Some(v) = view {
            if let Ok(StoreOutcome::Open | StoreOutcome::Closed(_)) =
                self.cache.store(o, s, end.map(Tid), Tid(v), tpl.clone())
            {
                return;
            }
        }
        if self.exact.get_exact(o, s).is_none() {
            if let Some(next) = serial.checked_add(1) {
                let _ = self.exact.store(o, s, Some(Tid(next)), s, tpl.clone());
            }
        }
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let c = self.cache.stats();
        let e = self.exact.stats();
        let read = |a: &AtomicU64| a.load(Ordering::Relaxed);
        d.set_item("activations", read(&self.activations))?;
        d.set_item("hits", read(&self.hits))?;
        d.set_item("misses", read(&self.misses))?;
        d.set_item("decoded", read(&self.decoded))?;
        d.set_item("first_reads", read(&self.first_reads))?;
        d.set_item("entries", c.entries + e.entries)?;
        d.set_item("exact_entries", e.entries)?;
        d.set_item("bytes", c.bytes + e.bytes)?;
        d.set_item("capacity", c.capacity)?;
        d.set_item("stores", c.stores + e.stores)?;
        d.set_item("refused", c.refused)?;
        d.set_item("invalidations", c.invalidations)?;
        d.set_item("reclaimed", c.reclaimed)?;
        d.set_item("evicted", c.evicted + e.evicted)?;
        d.set_item("log_restarts", read(&self.log_restarts))?;
        d.set_item("horizon", self.cache.horizon().map(|t| t.0))?;
        let mut total = 0;
        for r in Reason::ALL {
            let n = read(&self.fallbacks[r.index()]);
            total += n;
            d.set_item(format!("fallback_{}", r.name()), n)?;
        }
        let no_view = read(&self.no_view);
        d.set_item("fallback_no_view", no_view)?;
        d.set_item("fallbacks", total)?;
        Ok(d)
    }
}

/// `SharedStates(capacity_bytes, decode_first=True)`: the template cache
/// of one database in this process (`tidecache.shared` makes one per
/// `ZODB.DB`). Bounded to `capacity_bytes` (estimated bytes of the decoded
/// templates). With `decode_first=False` a revision's first activation in
/// the process is ZODB's own and only a second one decodes it (for
/// workloads that mostly read revisions once: a decode costs more than an
/// unpickling).
#[pyclass(name = "SharedStates", module = "tidecache._native", frozen)]
pub(crate) struct PySharedStates {
    pub(crate) inner: Arc<TemplateCache>,
}

#[pymethods]
impl PySharedStates {
    #[new]
    #[pyo3(signature = (capacity_bytes, decode_first = true))]
    fn new(capacity_bytes: u64, decode_first: bool) -> Self {
        PySharedStates {
            inner: Arc::new(TemplateCache::new(capacity_bytes.max(1), decode_first)),
        }
    }

    /// Starts (or restarts) the log at tid `at`: the caller will report
    /// every change after it. Drops open templates.
    fn start_log(&self, at: u64) {
        self.inner.start_log(at)
    }

    /// Drops every template (the history changed).
    fn flush(&self) {
        self.inner.flush()
    }

    /// Applies an exact report `(from_tid, to_tid, [(oid, tid)])` to the
    /// templates only: what a process that is not joined to the sidecar
    /// learns of commits (the client's `report` applies here too).
    fn report(&self, from_tid: u64, to_tid: u64, changes: Vec<(u64, u64)>) {
        self.inner.report(from_tid, to_tid, &changes, None)
    }

    /// The log's horizon (a tid), `None` before it starts.
    #[getter]
    fn horizon(&self) -> Option<u64> {
        self.inner.cache.horizon().map(|t| t.0)
    }

    /// Counters as a dict: `activations`, `hits` (templates found),
    /// `misses` (a load was needed), `decoded`, `entries`, `bytes`,
    /// `capacity`, `stores`, `refused`, `invalidations`, `reclaimed`,
    /// `evicted`, `log_restarts`, `horizon`, `fallbacks` and
    /// `fallback_<reason>` per reason (`savepoint`, `unknown_type`,
    /// `decode_error`, `class_factory`, `broken`, `persistent_class`),
    /// and `fallback_no_view` (activations in MVCC mode before the
    /// connection had a view: decoded, kept exact).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.inner.stats(py)
    }
}

/// `u64` of an 8-byte oid or tid.
fn u64_of(b: &Bound<'_, PyAny>) -> PyResult<u64> {
    let b = b.downcast::<PyBytes>()?.as_bytes();
    let a: [u8; 8] = b
        .try_into()
        .map_err(|_| pyo3::exceptions::PyValueError::new_err("an oid or tid is 8 bytes"))?;
    Ok(u64::from_be_bytes(a))
}

/// `setstate(conn, obj) -> bool`: `ZODB.Connection.Connection.setstate`
/// for a connection with shared state (`tidecache.shared.SharedStateMixin`):
/// the template of `obj`'s revision at the connection's view, materialised
/// and handed to `obj.__setstate__`; then what ZODB's `setstate` does
/// besides: `_p_serial`, the pickle cache's size estimation,
/// `_p_estimated_size`, `_load_count`, and a blob's committed file.
///
/// Reads on `conn`: `opened`, `_tc_states` (a `SharedStates`), `_tc_plain`
/// (a reason to use ZODB's own path for every object, or None), `_tc_mvcc`,
/// `_savepoint_storage`, `_storage`, `_cache`, `_reader`, `_load_count`.
/// Returns `False` when ZODB's own `setstate` must run instead (the caller
/// runs it): a closed connection (it raises `ConnectionStateError`),
/// savepoint data, Broken classes (each counted); a record that cannot be
/// shared is activated here by ZODB's `ObjectReader` from the pickle kept
/// (counted). Raises what the storage's load raises
/// (`ReadConflictError`, `POSKeyError`) and what `__setstate__` raises.
#[pyfunction]
pub(crate) fn setstate(py: Python<'_>, conn: &Bound<'_, PyAny>, obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    let g = Globals::get(py)?;
    let plain = || -> PyResult<bool> { Ok(false) };
    if conn.getattr(intern!(py, "opened"))?.is_none() {
        return plain();
    }
    let states = conn.getattr(intern!(py, "_tc_states"))?;
    let Ok(states) = states.downcast::<PySharedStates>() else {
        return plain();
    };
    let t = &*states.get().inner;
    bump(&t.activations);
    let plain_reason = conn.getattr(intern!(py, "_tc_plain"))?;
    if !plain_reason.is_none() {
        t.fallback(if plain_reason.eq("class_factory")? {
            Reason::ClassFactory
        } else {
            Reason::CustomConnection
        });
        return plain();
    }
    if !conn.getattr(intern!(py, "_savepoint_storage"))?.is_none() {
        t.fallback(Reason::Savepoint);
        return plain();
    }
    // Subclass checks on the type: `isinstance` would read `__class__`
    // through the persistent object's own `__getattribute__` when false.
    let kind = obj.get_type();
    if obj.is_instance_of::<pyo3::types::PyType>() {
        // A persistent class (ZODB.persistentclass): its metaclass's
        // `__setstate__` is a descriptor of its own; ZODB's path.
        t.fallback(Reason::PersistentClass);
        return plain();
    }
    if kind.is_subclass(g.broken.bind(py).downcast::<pyo3::types::PyType>()?)? {
        t.fallback(Reason::Broken);
        return plain();
    }
    let storage = conn.getattr(intern!(py, "_storage"))?;
    let oid_bytes = obj.getattr(intern!(py, "_p_oid"))?;
    let oid = u64_of(&oid_bytes)?;
    // 0: exact mode; 1: MVCC, the view is the instance's `_start` minus
    // one (ZODB's MVCCAdapterInstance, read here without a Python call);
    // 2: MVCC, the instance's `_tc_shared_view()` says (RelStorage).
    let mode: u8 = conn.getattr(intern!(py, "_tc_mvcc"))?.extract()?;
    let mvcc = mode != 0;

    let mut found: Option<(Arc<Template>, u64)> = None;
    let mut view = None;
    if mvcc {
        let v = if mode == 1 {
            let start = storage.getattr(intern!(py, "_start"))?;
            if start.is_none() {
                start
            } else {
                u64_of(&start)?.checked_sub(1).into_pyobject(py)?.into_any()
            }
        } else {
            storage.call_method0(intern!(py, "_tc_shared_view"))?
        };
        if v.is_none() {
            bump(&t.no_view);
        } else {
            let v: u64 = v.extract()?;
            view = Some(v);
            if let Some(hit) = t.cache.lookup(Oid(oid), Tid(v)) {
                found = Some((hit.state, hit.serial.0));
            }
        }
    }
    let (tpl, serial) = match found {
        Some(f) => {
            bump(&t.hits);
            f
        }
        None => {
            // A load: the instance's (arena, then base) in MVCC mode with
            // the revision's validity; the storage's own otherwise.
            let (data, serial, end, seen_at) = if mvcc {
                let r = storage.call_method1(intern!(py, "_tc_load_revision"), (&oid_bytes,))?;
                let r = r.downcast::<PyTuple>()?;
                let end: Option<u64> = r.get_item(2)?.extract()?;
                let seen_at: Option<u64> = r.get_item(3)?.extract()?;
                (r.get_item(0)?, r.get_item(1)?, end, seen_at.or(view))
            } else {
                let r = storage.call_method1(intern!(py, "load"), (&oid_bytes,))?;
                let r = r.downcast::<PyTuple>()?;
                (r.get_item(0)?, r.get_item(1)?, None, None)
            };
            let Ok(data) = data.downcast::<PyBytes>() else {
                // No record (a blob-only or deleted object): ZODB's path.
                t.fallback(Reason::DecodeError);
                return plain();
            };
            let s = u64_of(&serial)?;
            let seen_at = seen_at.filter(|_| mvcc);
            let tpl = match t.get_exact(oid, s) {
                Some((tpl, by_serial_only)) => {
                    bump(&t.hits);
                    if by_serial_only && seen_at.is_some() {
                        // Held by serial only: give it its validity now,
                        // if the log accepts it.
                        t.keep(oid, s, end, seen_at, &tpl);
                    }
                    tpl
                }
                None if !t.decode_first && !t.seen_before(oid, s) => {
                    // Without `decode_first`, a revision's first activation
                    // in this process is ZODB's own (decoding costs more
                    // than unpickling): one read only is never decoded; a
                    // second one is.
                    bump(&t.misses);
                    bump(&t.first_reads);
                    return finish(py, conn, obj, &storage, &oid_bytes, s, Source::Pickle(data.clone()), t)
                        .map(|_| true);
                }
                None => {
                    bump(&t.misses);
                    bump(&t.decoded);
                    let tpl = Arc::new(decode(py, data));
                    t.keep(oid, s, end, seen_at, &tpl);
                    tpl
                }
            };
            (tpl, s)
        }
    };

    finish(py, conn, obj, &storage, &oid_bytes, serial, Source::Template(tpl), t)?;
    Ok(true)
}

/// What an activation builds the state from.
enum Source<'py> {
    /// A template (shared, or a fallback keeping its pickle).
    Template(Arc<Template>),
    /// The record itself, unpickled by ZODB's `ObjectReader`.
    Pickle(Bound<'py, PyBytes>),
}

/// The state set on `obj` from `source`, then what ZODB's `setstate`
/// does besides (`_p_serial`, sizes, `_load_count`, blobs).
#[allow(clippy::too_many_arguments)]
fn finish<'py>(
    py: Python<'py>,
    conn: &Bound<'py, PyAny>,
    obj: &Bound<'py, PyAny>,
    storage: &Bound<'py, PyAny>,
    oid_bytes: &Bound<'py, PyAny>,
    serial: u64,
    source: Source<'py>,
    t: &TemplateCache,
) -> PyResult<()> {
    let g = Globals::get(py)?;
    let kind = obj.get_type();
    let size = match &source {
        Source::Template(tpl) => tpl.size(py),
        Source::Pickle(p) => p.as_bytes().len(),
    };
    let tpl = match source {
        Source::Pickle(p) => {
            conn.getattr(intern!(py, "_reader"))?
                .call_method1(intern!(py, "setGhostState"), (obj, p))?;
            None
        }
        Source::Template(tpl) => Some(tpl),
    };
    if let Some(tpl) = tpl {
        match &*tpl {
            Template::Fallback { pickle, reason } => {
                t.fallback(*reason);
                conn.getattr(intern!(py, "_reader"))?
                    .call_method1(intern!(py, "setGhostState"), (obj, pickle.bind(py)))?;
            }
            Template::Shared {
                root, slots, aliased, ..
            } => {
                // The class's `__setstate__`, called unbound when it is a
                // plain function or a C method (no lookup through the
                // persistent object's own `__getattribute__`); any other
                // descriptor is bound through the object, as Python would.
                let method = kind.getattr(intern!(py, "__setstate__"))?;
                let default = method.is(g.persistent_setstate.bind(py)) && !UNSAFE_SHARE.load(Ordering::Relaxed);
                let mut r = Resolver::new(py, conn, *slots, *aliased);
                let state = r.state(root, default)?;
                let unbound = method.is_instance_of::<pyo3::types::PyFunction>()
                    || method.get_type().is(&g.persistent_setstate.bind(py).get_type());
                if unbound {
                    method.call1((obj, state))?;
                } else {
                    obj.call_method1(intern!(py, "__setstate__"), (state,))?;
                }
            }
        }
    }
    let serial_bytes = PyBytes::new(py, &serial.to_be_bytes());
    obj.setattr(intern!(py, "_p_serial"), &serial_bytes)?;
    conn.getattr(intern!(py, "_cache"))?
        .call_method1(intern!(py, "update_object_size_estimation"), (oid_bytes, size))?;
    obj.setattr(intern!(py, "_p_estimated_size"), size)?;
    let count: u64 = conn.getattr(intern!(py, "_load_count"))?.extract()?;
    conn.setattr(intern!(py, "_load_count"), count + 1)?;
    if kind.is_subclass(g.blob.bind(py).downcast::<pyo3::types::PyType>()?)? {
        obj.setattr(intern!(py, "_p_blob_uncommitted"), py.None())?;
        let committed = storage.call_method1(intern!(py, "loadBlob"), (oid_bytes, &serial_bytes))?;
        obj.setattr(intern!(py, "_p_blob_committed"), committed)?;
    }
    Ok(())
}

/// Test switch (`tidecache._native._unsafe_share_containers(flag)`): with
/// `True`, lists, dicts and bytearrays of leaves are shared between
/// connections instead of copied, and top-level dicts are handed to every
/// `__setstate__`: the naive sharing that leaks one connection's
/// uncommitted change into the others. Only for tests that must be seen
/// failing; returns the previous setting.
#[pyfunction]
#[pyo3(name = "_unsafe_share_containers")]
pub(crate) fn share_containers_naively(flag: bool) -> bool {
    UNSAFE_SHARE.swap(flag, Ordering::Relaxed)
}
