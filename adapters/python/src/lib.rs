//! `tidecache._native`: the PyO3 bindings of tidecache-client.
//!
//! One class, [`PyClient`] (`tidecache.Client` in Python), and three
//! exceptions. Oids and tids are Python ints (ZODB's `u64(oid)`), states are
//! `bytes`. Every call that talks to the sidecar releases the GIL; the
//! calls an application thread makes per transaction and per load (reports,
//! resyncs, views, `store_later`, lookups in the arena) do not talk to it:
//! they queue for the session's background thread, in microseconds, and
//! keep the GIL.

mod shared;

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::time::Duration;
use tidecache_client::protocol::{AttachState, StoreItem};
use tidecache_client::session::Read;
use tidecache_client::{ClientConfig, ClientError, Session};

create_exception!(
    _native,
    TideCacheError,
    PyException,
    "Base class of tidecache's errors."
);
create_exception!(
    _native,
    Unavailable,
    TideCacheError,
    "The sidecar is absent, dead, restarting, slow or garbled: treat as a miss."
);
create_exception!(
    _native,
    RefusedError,
    TideCacheError,
    "The sidecar refused the request; the subclass says why (one per kind)."
);
create_exception!(
    _native,
    GapError,
    RefusedError,
    "An invalidation report started after the sidecar's horizon and was refused; resync."
);
create_exception!(
    _native,
    LimitError,
    RefusedError,
    "A limit of the sidecar: --max-databases databases attached, or a Lookup of too many oids."
);
create_exception!(
    _native,
    UnknownViewError,
    RefusedError,
    "A view this connection did not register, or one the sidecar detached (--max-log-changes)."
);
create_exception!(
    _native,
    FutureTidError,
    RefusedError,
    "A tid more than a day past the sidecar's clock (check the clocks, or the storage)."
);
create_exception!(
    _native,
    BadRequestError,
    RefusedError,
    "A request that breaks a rule: a change outside its report's interval, a store ending before it starts."
);
create_exception!(
    _native,
    StaleError,
    RefusedError,
    "The database was flushed by another process since this client joined it (a restored backup?): attach again, with a proof."
);
create_exception!(
    _native,
    ProtocolError,
    RefusedError,
    "The sidecar could not read the request (frame too large, not MessagePack, unknown message, no Hello, other protocol version)."
);

/// `(serial, state)` of a hit, or `None`.
type PyHit<'py> = Option<(u64, Bound<'py, PyBytes>)>;

/// One Python exception per kind of error: `Unavailable` (treat as a
/// miss), and a subclass of `RefusedError` per refusal code.
fn to_py(e: ClientError) -> PyErr {
    use tidecache_client::protocol::ErrorCode;
    let msg = e.to_string();
    match &e {
        ClientError::Unavailable { .. } | ClientError::NotAttached { .. } => Unavailable::new_err(msg),
        ClientError::Refused { code, .. } => match code {
            ErrorCode::Gap => GapError::new_err(msg),
            ErrorCode::Limit => LimitError::new_err(msg),
            ErrorCode::UnknownView => UnknownViewError::new_err(msg),
            ErrorCode::FutureTid => FutureTidError::new_err(msg),
            ErrorCode::BadRequest => BadRequestError::new_err(msg),
            ErrorCode::Stale => StaleError::new_err(msg),
            ErrorCode::FrameTooLarge
            | ErrorCode::Malformed
            | ErrorCode::UnknownMessage
            | ErrorCode::NoHello
            | ErrorCode::VersionMismatch => ProtocolError::new_err(msg),
            #[allow(unreachable_patterns)]
            _ => RefusedError::new_err(msg),
        },
        #[allow(unreachable_patterns)]
        _ => RefusedError::new_err(msg),
    }
}

/// A client of `tidecached` bound to one database.
///
/// `Client(socket, database="default", timeout_ms=50)`: `socket` is the
/// sidecar's Unix socket path, `database` the key of the database (the
/// storage adapter derives it from the base storage), `timeout_ms` the bound
/// on each call in milliseconds. Connects lazily and reconnects by itself.
/// A thin binding of [`Session`]: fork-safe as it is (a forked child gets
/// its own connection and outbox and never waits on a lock of its
/// parent's).
#[pyclass(name = "Client", module = "tidecache._native", frozen)]
struct PyClient {
    session: Session,
    /// What the last `attach` answered `"prove"` asks about.
    proof: std::sync::Mutex<Option<ProofRequest>>,
    /// The process's template cache of this database (shared state), fed
    /// every report, resync and flush before they are queued.
    shared: std::sync::Mutex<Option<std::sync::Arc<shared::TemplateCache>>>,
}

/// `(horizon, witness oids, open sample [(oid, serial)])` of a `"prove"`
/// answer.
type ProofRequest = (u64, Vec<u64>, Vec<(u64, u64)>);

#[pymethods]
impl PyClient {
    #[new]
    #[pyo3(signature = (socket, database = "default".to_owned(), timeout_ms = 50))]
    fn new(socket: String, database: String, timeout_ms: u64) -> Self {
        let mut config = ClientConfig::new(socket);
        config.timeout = Duration::from_millis(timeout_ms.max(1));
        config.name = format!("python pid {}", std::process::id());
        PyClient {
            session: Session::new(config, database),
            proof: std::sync::Mutex::new(None),
            shared: std::sync::Mutex::new(None),
        }
    }

    /// The database key.
    #[getter]
    fn database(&self) -> &str {
        self.session.database()
    }

    /// The sidecar's horizon for this database as the last `attach`,
    /// `report` or `resync` answered it (a tid as an int; 0 before the log
    /// starts). An adapter whose storage is past it after attaching fills
    /// the gap from its storage's transaction iterator.
    #[getter]
    fn horizon(&self) -> u64 {
        self.session.horizon()
    }

    /// Whether a connection to the sidecar is open now.
    #[getter]
    fn connected(&self) -> bool {
        self.session.is_connected()
    }

    /// Attaches with the storage's `lastTransaction()` as an int and, after
    /// a `"prove"` answer, `proven`: the horizon this process proved its
    /// storage holds. Returns `"started"` (a new or flushed database's log
    /// starts there), `"joined"`, `"behind"` (below the sidecar's horizon:
    /// the storage lags or was restored; nothing changed), or `"prove"`:
    /// nothing changed, prove what [`proof`] says and attach again with
    /// `proven=horizon`, or `flush()` and attach again if the proof fails
    /// (invariant 7). Until `"started"` or `"joined"`, lookups raise
    /// `Unavailable`, `report` and `resync` too, and `store_later` drops.
    /// Raises `Unavailable`, `RefusedError` (a tid a day past the
    /// sidecar's clock).
    #[pyo3(signature = (last_tid, proven = None))]
    fn attach(&self, py: Python<'_>, last_tid: u64, proven: Option<u64>) -> PyResult<&'static str> {
        let state = py
            .allow_threads(|| self.session.attach(last_tid, proven))
            .map_err(to_py)?;
        let horizon = self.session.horizon();
        let mut proof = self.proof.lock().unwrap_or_else(|p| p.into_inner());
        *proof = None;
        Ok(match state {
            AttachState::Started => "started",
            AttachState::Joined => "joined",
            AttachState::Behind => "behind",
            AttachState::Prove { witness, open_sample } => {
                *proof = Some((horizon, witness, open_sample));
                "prove"
            }
        })
    }

    /// What the last `attach` answered `"prove"` asks: `(horizon, witness,
    /// open_sample)`, `witness` a list of oids changed at exactly `horizon`
    /// (`loadBefore(oid, horizon + 1)` must give serial `horizon`; empty:
    /// the storage's iterator must have a transaction at `horizon`),
    /// `open_sample` a list of `(oid, serial)` the sidecar holds open
    /// (`loadBefore(oid, horizon + 1)` must give `serial`). `None` after any
    /// other answer.
    #[getter]
    fn proof(&self) -> Option<ProofRequest> {
        self.proof.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether this database is joined (an attach answered `"started"` or
    /// `"joined"`) and the connection is up.
    #[getter]
    fn attached(&self) -> bool {
        self.session.client().is_attached(self.session.database())
    }

    /// Whether this database is joined (an attach answered `"started"` or
    /// `"joined"`) and no `Stale` answer forgot it since (another process
    /// flushed it: attach again, with a proof), connected or not.
    #[getter]
    fn joined(&self) -> bool {
        self.session.client().is_joined(self.session.database())
    }

    /// `(serial, state)` of the revision of `oid` visible at `view`, or
    /// `None`. Read from the sidecar's arena, mapped into this process: no
    /// system call, the GIL held (it takes well under a microsecond). Before
    /// the first attach, or when the arena cannot be mapped, it asks the
    /// sidecar over the socket. Raises `Unavailable` when the sidecar is
    /// down (the caller loads from its storage). Counted, a hit or a miss
    /// (an `Unavailable` too: the caller loads from its storage), in the
    /// counts sent to the sidecar (`tidecache_hits_total`).
    fn lookup<'py>(&self, py: Python<'py>, oid: u64, view: u64) -> PyResult<PyHit<'py>> {
        if let Some(hit) = self.read(py, oid, view, true) {
            return Ok(hit);
        }
        if let Err(e) = self.socket_lookups_allowed() {
            self.session.note_miss(1);
            return Err(e);
        }
        let mut r = py
            .allow_threads(|| self.session.lookup(view, vec![oid]))
            .map_err(to_py)?;
        Ok(r.pop().flatten().map(|f| (f.serial, PyBytes::new(py, &f.state))))
    }

    /// [`lookup`] for many oids: a list with one `(serial, state)` or `None`
    /// per oid. Raises `Unavailable`. A probe (RelStorage's prefetch): not
    /// counted as hits or misses, the loads that follow are.
    fn lookup_many<'py>(&self, py: Python<'py>, oids: Vec<u64>, view: u64) -> PyResult<Vec<PyHit<'py>>> {
        let local: Option<Vec<PyHit<'py>>> = oids.iter().map(|&oid| self.read(py, oid, view, false)).collect();
        if let Some(hits) = local {
            return Ok(hits);
        }
        self.socket_lookups_allowed()?;
        let r = py.allow_threads(|| self.session.peek(view, oids)).map_err(to_py)?;
        Ok(r.into_iter()
            .map(|o| o.map(|f| (f.serial, PyBytes::new(py, &f.state))))
            .collect())
    }

    /// Stores the revision `(oid, serial)` with `end` (None if it was
    /// current at `view`) and waits for the answer; returns whether it was
    /// kept. Raises `Unavailable`, `RefusedError` (end <= serial).
    #[pyo3(signature = (oid, serial, end, state, view))]
    fn store(
        &self,
        py: Python<'_>,
        oid: u64,
        serial: u64,
        end: Option<u64>,
        state: Vec<u8>,
        view: u64,
    ) -> PyResult<bool> {
        let item = StoreItem {
            oid,
            serial,
            end,
            view,
            state,
        };
        py.allow_threads(|| self.session.store(item)).map_err(to_py)
    }

    /// Queues a store for the background sender (batched, off the caller's
    /// path). Returns False if the store was dropped: the queue was full, or
    /// the database is not joined (a storage not proved to hold the
    /// sidecar's history must not store into it, invariant 7).
    #[pyo3(signature = (oid, serial, end, state, view))]
    fn store_later(&self, oid: u64, serial: u64, end: Option<u64>, state: &[u8], view: u64) -> bool {
        // `&[u8]`: the bytes' buffer, copied once (a `Vec<u8>` argument
        // would be extracted element by element, microseconds a state).
        self.session.store_later(oid, serial, end, state.to_vec(), view)
    }

    /// Waits until everything queued before (reports, views, stores) was
    /// sent; returns whether that happened within `timeout_ms`.
    #[pyo3(signature = (timeout_ms = 5000))]
    fn wait_for_stores(&self, py: Python<'_>, timeout_ms: u64) -> bool {
        py.allow_threads(|| self.session.wait_for_stores(Duration::from_millis(timeout_ms)))
    }

    /// Queues the report of every change in `(from_tid, to_tid]`
    /// (`changes`: a list of `(oid, tid)`) and returns at once: the
    /// session's background thread sends it, in order with views and
    /// stores. Raises nothing: a report the sidecar answers with a gap, or
    /// that is lost (sidecar unavailable, queue full), is followed by a
    /// resync, and `horizon` moves when the answer comes. (Before queued
    /// reports, this raised `GapError`; `report_now` still does.)
    fn report(&self, from_tid: u64, to_tid: u64, changes: Vec<(u64, u64)>) {
        if let Some(t) = self.templates() {
            t.report(from_tid, to_tid, &changes, self.session.lowest_view());
        }
        self.session.report(from_tid, to_tid, changes)
    }

    /// Sends the report now and waits for the answer (tools and tests);
    /// returns the sidecar's horizon. Raises `GapError` when `from_tid` is
    /// past the horizon, `Unavailable`, `RefusedError`.
    fn report_now(&self, py: Python<'_>, from_tid: u64, to_tid: u64, changes: Vec<(u64, u64)>) -> PyResult<u64> {
        if let Some(t) = self.templates() {
            t.report(from_tid, to_tid, &changes, self.session.lowest_view());
        }
        py.allow_threads(|| self.session.report_now(from_tid, to_tid, changes))
            .map_err(to_py)
    }

    /// Queues a collapsed invalidation report for `(frm, to]`: `changes`
    /// is a list of `(oid, tid)`, every oid changed in the interval once or
    /// more, each `tid` its newest change there or an upper bound of it
    /// (`to` for ZEO's reconnect, the exact newest for RelStorage's poll).
    /// Applied conservatively. Returns at once and raises nothing, as
    /// `report` (a gap or a loss is followed by a resync).
    fn report_collapsed(&self, frm: u64, to: u64, changes: Vec<(u64, u64)>) {
        if let Some(t) = self.templates() {
            t.report_collapsed(frm, to, &changes, self.session.lowest_view());
        }
        self.session.report_collapsed(frm, to, changes)
    }

    /// Sends the collapsed report now and waits (tools and tests); returns
    /// the sidecar's horizon. Raises `GapError` when `frm` is past the
    /// horizon, `Unavailable`, `RefusedError`.
    fn report_collapsed_now(&self, py: Python<'_>, frm: u64, to: u64, changes: Vec<(u64, u64)>) -> PyResult<u64> {
        if let Some(t) = self.templates() {
            t.report_collapsed(frm, to, &changes, self.session.lowest_view());
        }
        py.allow_threads(|| self.session.report_collapsed_now(frm, to, changes))
            .map_err(to_py)
    }

    /// Feeds `states` (a `SharedStates`, the process's template cache of
    /// this database) every report, collapsed report, resync and flush
    /// made through this client from now on, in the caller's order, before
    /// they are queued for the sidecar: the in-process layer and the
    /// sidecar follow one chain of reports (shared state, issue 10). The
    /// caller starts its log (`states.start_log(tid)`) at the tid after
    /// which it reports everything, under the lock its reports are made
    /// under.
    fn share_states(&self, states: &Bound<'_, shared::PySharedStates>) {
        *self.shared.lock().unwrap_or_else(|p| p.into_inner()) = Some(states.get().inner.clone());
    }

    /// Queues a resync: invalidations up to `tid` were lost. Returns at
    /// once; raises nothing.
    fn resync(&self, tid: u64) {
        if let Some(t) = self.templates() {
            t.resync(tid);
        }
        self.session.resync(tid)
    }

    /// Opens a connection's view at `tid`; returns its id. Kept in this
    /// process (no system call in the common case): the background thread
    /// registers the process's oldest view with the sidecar. Never raises.
    fn register_view(&self, tid: u64) -> u64 {
        self.session.register_view(tid)
    }

    /// Moves view `view_id` to `tid`. Never raises; no system call unless
    /// the process's oldest view went down.
    fn advance_view(&self, view_id: u64, tid: u64) {
        self.session.advance_view(view_id, tid)
    }

    /// Closes view `view_id`. Never raises; no system call.
    fn release_view(&self, view_id: u64) {
        self.session.release_view(view_id)
    }

    /// Counts `n` lookups that went to the base storage without `lookup`
    /// (a state a prefetch loaded): sent to the sidecar with the others.
    #[pyo3(signature = (n = 1))]
    fn note_miss(&self, n: u64) {
        self.session.note_miss(n)
    }

    /// `(hits, misses)`: this process's lookups counted by `lookup` and
    /// `note_miss`, the counts it sends to the sidecar.
    #[getter]
    fn lookups(&self) -> (u64, u64) {
        self.session.lookups()
    }

    /// Sends the counts of lookups not sent yet to the sidecar now (with
    /// everything queued before); returns whether they went out within
    /// `timeout_ms` (False while the sidecar is unavailable: they are kept).
    #[pyo3(signature = (timeout_ms = 1000))]
    fn send_counts(&self, py: Python<'_>, timeout_ms: u64) -> bool {
        py.allow_threads(|| self.session.send_counts(Duration::from_millis(timeout_ms)))
    }

    /// `(resyncs, lost)`: resyncs the background thread sent in place of a
    /// report (a gap, a report lost before), and reports or resyncs lost to
    /// an unavailable sidecar.
    #[getter]
    fn outbox_counts(&self) -> (u64, u64) {
        self.session.outbox_counts()
    }

    /// Waits (at most 1 s) for everything queued (reports, views, stores)
    /// to be sent, drops what is left, ends the background thread, then
    /// closes the connection for good; the sidecar releases this client's
    /// views. Nothing of this client runs afterwards. Later calls raise
    /// `Unavailable` (or are dropped, for queued ones).
    fn close(&self, py: Python<'_>) {
        py.allow_threads(|| self.session.close())
    }

    /// Drops every revision of this database in the sidecar. Raises
    /// `Unavailable`.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        if let Some(t) = self.templates() {
            t.flush();
        }
        py.allow_threads(|| self.session.flush()).map_err(to_py)
    }

    /// The sidecar's counters as a dict: `clients`, `capacity_bytes`,
    /// `total` and `databases` (per key: `entries`, `bytes`, `hits`,
    /// `misses`, `stores`, `refused`, `invalidations`, `reclaimed`,
    /// `evicted`, `views`, `horizon`, `low_water_mark`, `log_start`,
    /// `log_len`, `detached`), as `tidecached stats` prints them. Raises
    /// `Unavailable`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let text = self.stats_json(py)?;
        py.import("json")?.call_method1("loads", (text,))
    }

    /// The sidecar's counters as JSON text (see `tidecached stats`).
    /// Raises `Unavailable`.
    fn stats_json(&self, py: Python<'_>) -> PyResult<String> {
        let s = py.allow_threads(|| self.session.stats()).map_err(to_py)?;
        serde_json::to_string(&s).map_err(|e| RefusedError::new_err(e.to_string()))
    }
}

impl PyClient {
    fn templates(&self) -> Option<std::sync::Arc<shared::TemplateCache>> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A lookup over the socket is for a joined, connected client whose
    /// arena cannot be mapped; otherwise `Unavailable` at once (it would
    /// wait for the connection's lock, which a call in progress holds).
    fn socket_lookups_allowed(&self) -> PyResult<()> {
        if self.session.client().serves_over_socket(self.session.database()) {
            Ok(())
        } else {
            self.session.reconnect_later();
            Err(Unavailable::new_err(
                "no arena to read: not connected to tidecached, or the database is not joined",
            ))
        }
    }

    /// Reads `oid` at `view` from the mapped arena straight into a new
    /// `bytes` (one copy, validated in place): `Some(hit or None)`, or
    /// `None` when there is no arena to read. `counted`: a lookup
    /// ([`Session::lookup_into`]), else a probe ([`Session::peek_into`]).
    fn read<'py>(&self, py: Python<'py>, oid: u64, view: u64, counted: bool) -> Option<PyHit<'py>> {
        let fill = |len: usize, copy: &mut dyn FnMut(&mut [u8]) -> bool| {
            PyBytes::new_with(py, len, |buf| {
                if copy(buf) {
                    Ok(())
                } else {
                    Err(Unavailable::new_err("changed while read"))
                }
            })
            .ok()
        };
        let read = if counted {
            self.session.lookup_into(oid, view, fill)
        } else {
            self.session.peek_into(oid, view, fill)
        };
        match read {
            Read::Hit { serial, state } => Some(Some((serial, state))),
            Read::Miss => Some(None),
            Read::NoArena => None,
        }
    }
}

/// The native half of the `tidecache` package.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyClient>()?;
    m.add_class::<shared::PySharedStates>()?;
    m.add_function(wrap_pyfunction!(shared::setstate, m)?)?;
    m.add_function(wrap_pyfunction!(shared::share_containers_naively, m)?)?;
    let py = m.py();
    m.add("TideCacheError", py.get_type::<TideCacheError>())?;
    m.add("Unavailable", py.get_type::<Unavailable>())?;
    m.add("GapError", py.get_type::<GapError>())?;
    m.add("RefusedError", py.get_type::<RefusedError>())?;
    m.add("LimitError", py.get_type::<LimitError>())?;
    m.add("UnknownViewError", py.get_type::<UnknownViewError>())?;
    m.add("FutureTidError", py.get_type::<FutureTidError>())?;
    m.add("BadRequestError", py.get_type::<BadRequestError>())?;
    m.add("ProtocolError", py.get_type::<ProtocolError>())?;
    m.add("StaleError", py.get_type::<StaleError>())?;
    m.add("PROTOCOL_VERSION", tidecache_client::protocol::PROTOCOL_VERSION)?;
    // The workspace's version (root Cargo.toml), the one `tidecached
    // --version` and `stats` show; re-exported as `tidecache.__version__`.
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
