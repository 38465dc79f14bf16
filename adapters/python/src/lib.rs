//! `tidecache._native`: the PyO3 bindings of tidecache-client.
//!
//! One class, [`PyClient`] (`tidecache.Client` in Python), and three
//! exceptions. Oids and tids are Python ints (ZODB's `u64(oid)`), states are
//! `bytes`. Every call releases the GIL while it talks to the sidecar.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::time::Duration;
use tidecache_client::protocol::{AttachState, StoreItem};
use tidecache_client::{Client, ClientConfig, ClientError, MappedArena, Slot, StoreQueue};

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
    GapError,
    TideCacheError,
    "An invalidation report started after the sidecar's horizon and was refused; resync."
);
create_exception!(
    _native,
    RefusedError,
    TideCacheError,
    "The sidecar refused the request as malformed."
);

/// `(serial, state)` of a hit, or `None`.
type PyHit<'py> = Option<(u64, Bound<'py, PyBytes>)>;

fn to_py(e: ClientError) -> PyErr {
    match &e {
        ClientError::Unavailable { .. } => Unavailable::new_err(e.to_string()),
        _ if e.is_gap() => GapError::new_err(e.to_string()),
        _ => RefusedError::new_err(e.to_string()),
    }
}

/// A client of `tidecached` bound to one database.
///
/// `Client(socket, database="default", timeout_ms=50)`: `socket` is the
/// sidecar's Unix socket path, `database` the key of the database (the
/// storage adapter derives it from the base storage), `timeout_ms` the bound
/// on each call in milliseconds. Connects lazily and reconnects by itself.
#[pyclass(name = "Client", module = "tidecache._native", frozen)]
struct PyClient {
    client: Client,
    database: String,
    config: ClientConfig,
    /// The background store sender and the process that started it (its
    /// thread does not survive a fork: a child starts its own).
    queue: std::sync::Mutex<Option<(u32, StoreQueue)>>,
    /// Hits so far; every [`TOUCH_EVERY`]th is reported to the sidecar.
    hits: std::sync::atomic::AtomicU64,
    /// The horizon in the last answer that carried one.
    horizon: std::sync::atomic::AtomicU64,
    /// Hits to report, sent [`TOUCH_BATCH`] at a time.
    touched: std::sync::Mutex<Vec<(u64, u64)>>,
}

/// Stores (and hint batches) a process may have queued; more are dropped
/// (a store is optional). The queue's ring is allocated whole, about 100
/// bytes a message: 16,384 cost each worker 1.6 MB (`bench/memory.py`).
const STORE_QUEUE_CAPACITY: usize = 2048;

/// Hit hints handed to the store queue at once (measured: one hint per
/// message cost 2 us each, mostly waking the queue's thread; 128 per
/// message, about 20 ns per hint).
const TOUCH_BATCH: usize = 128;

/// One hit in this many is sent to the sidecar as a hint for eviction.
/// Measured by `bench/eviction.py` (docs/benchmarks.md): every hit, 1 in 2,
/// 4 and 8 give hit ratios of 0.844, 0.834, 0.824 and 0.818 on the Zipf
/// trace with 32 MiB; each hint costs the sidecar a chain walk, hence 2.
const TOUCH_EVERY: u64 = 2;

#[pymethods]
impl PyClient {
    #[new]
    #[pyo3(signature = (socket, database = "default".to_owned(), timeout_ms = 50))]
    fn new(socket: String, database: String, timeout_ms: u64) -> Self {
        let mut config = ClientConfig::new(socket);
        config.timeout = Duration::from_millis(timeout_ms.max(1));
        config.name = format!("python pid {}", std::process::id());
        PyClient {
            client: Client::new(config.clone()),
            database,
            config,
            queue: std::sync::Mutex::new(None),
            hits: std::sync::atomic::AtomicU64::new(0),
            horizon: std::sync::atomic::AtomicU64::new(0),
            touched: std::sync::Mutex::new(Vec::with_capacity(TOUCH_BATCH)),
        }
    }

    /// The database key.
    #[getter]
    fn database(&self) -> &str {
        &self.database
    }

    /// The sidecar's horizon for this database as the last `attach`,
    /// `report` or `resync` answered it (a tid as an int; 0 before the log
    /// starts). An adapter whose storage is past it after attaching fills
    /// the gap from its storage's transaction iterator.
    #[getter]
    fn horizon(&self) -> u64 {
        self.horizon.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a connection to the sidecar is open now.
    #[getter]
    fn connected(&self) -> bool {
        self.client.is_connected()
    }

    /// Attaches with the storage's `lastTransaction()` as an int; returns
    /// `"started"` (a new database's log starts there), `"joined"`, or
    /// `"behind"` (below the sidecar's horizon: the storage lags or was
    /// restored; nothing changed). Raises `Unavailable`.
    fn attach(&self, py: Python<'_>, last_tid: u64) -> PyResult<&'static str> {
        let (state, horizon) = py
            .allow_threads(|| self.client.attach(&self.database, last_tid))
            .map_err(to_py)?;
        self.horizon.store(horizon, std::sync::atomic::Ordering::Relaxed);
        Ok(match state {
            AttachState::Started => "started",
            AttachState::Joined => "joined",
            AttachState::Behind => "behind",
        })
    }

    /// `(serial, state)` of the revision of `oid` visible at `view`, or
    /// `None`. Read from the sidecar's arena, mapped into this process: no
    /// system call, the GIL held (it takes well under a microsecond). Before
    /// the first attach, or when the arena cannot be mapped, it asks the
    /// sidecar over the socket. Raises `Unavailable` when the sidecar is
    /// down (the caller loads from its storage).
    fn lookup<'py>(&self, py: Python<'py>, oid: u64, view: u64) -> PyResult<PyHit<'py>> {
        if let Some(hit) = self
            .client
            .with_arena(&self.database, |a, slot| self.read(py, a, slot, oid, view))
        {
            return Ok(hit);
        }
        let mut r = py
            .allow_threads(|| self.client.lookup(&self.database, view, vec![oid]))
            .map_err(to_py)?;
        Ok(r.pop().flatten().map(|f| (f.serial, PyBytes::new(py, &f.state))))
    }

    /// [`lookup`] for many oids: a list with one `(serial, state)` or `None`
    /// per oid. Raises `Unavailable`.
    fn lookup_many<'py>(&self, py: Python<'py>, oids: Vec<u64>, view: u64) -> PyResult<Vec<PyHit<'py>>> {
        let local = self.client.with_arena(&self.database, |a, slot| {
            oids.iter()
                .map(|&oid| self.read(py, a, slot, oid, view))
                .collect::<Vec<_>>()
        });
        if let Some(hits) = local {
            return Ok(hits);
        }
        let r = py
            .allow_threads(|| self.client.lookup(&self.database, view, oids))
            .map_err(to_py)?;
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
        let (kept, _) = py
            .allow_threads(|| self.client.store(&self.database, vec![item]))
            .map_err(to_py)?;
        Ok(kept == 1)
    }

    /// Queues a store for the background sender (batched, off the caller's
    /// path). Returns False if the queue was full and the store dropped.
    #[pyo3(signature = (oid, serial, end, state, view))]
    fn store_later(&self, oid: u64, serial: u64, end: Option<u64>, state: Vec<u8>, view: u64) -> bool {
        match self.queue().as_ref() {
            Some((_, q)) => q.push(
                &self.database,
                StoreItem {
                    oid,
                    serial,
                    end,
                    view,
                    state,
                },
            ),
            None => false,
        }
    }

    /// Waits until queued stores were sent; returns whether that happened
    /// within `timeout_ms`.
    #[pyo3(signature = (timeout_ms = 5000))]
    fn wait_for_stores(&self, py: Python<'_>, timeout_ms: u64) -> bool {
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        match queue.as_ref() {
            Some((pid, q)) if *pid == std::process::id() => {
                py.allow_threads(|| q.barrier(Duration::from_millis(timeout_ms)))
            }
            _ => true,
        }
    }

    /// Reports every change in `(from_tid, to_tid]`: `changes` is a list of
    /// `(oid, tid)`. Returns the sidecar's horizon. Raises `GapError` when
    /// `from_tid` is past the horizon, `Unavailable`, `RefusedError`.
    fn report(&self, py: Python<'_>, from_tid: u64, to_tid: u64, changes: Vec<(u64, u64)>) -> PyResult<u64> {
        let h = py
            .allow_threads(|| self.client.report(&self.database, from_tid, to_tid, changes))
            .map_err(to_py)?;
        self.horizon.store(h, std::sync::atomic::Ordering::Relaxed);
        Ok(h)
    }

    /// Tells the sidecar invalidations up to `tid` were lost; returns
    /// whether its log restarted. Raises `Unavailable`.
    fn resync(&self, py: Python<'_>, tid: u64) -> PyResult<bool> {
        let (restarted, h) = py
            .allow_threads(|| self.client.resync(&self.database, tid))
            .map_err(to_py)?;
        self.horizon.store(h, std::sync::atomic::Ordering::Relaxed);
        Ok(restarted)
    }

    /// Registers a connection's view at `tid`; returns its id. Never raises:
    /// an unavailable sidecar learns of it on reconnect.
    fn register_view(&self, py: Python<'_>, tid: u64) -> u64 {
        py.allow_threads(|| self.client.register_view(&self.database, tid))
    }

    /// Moves view `view_id` to `tid`. Never raises.
    fn advance_view(&self, py: Python<'_>, view_id: u64, tid: u64) {
        py.allow_threads(|| self.client.advance_view(view_id, tid))
    }

    /// Releases view `view_id`. Never raises.
    fn release_view(&self, py: Python<'_>, view_id: u64) {
        py.allow_threads(|| self.client.release_view(view_id))
    }

    /// Waits (at most 1 s) for queued stores, then closes the connection
    /// for good; the sidecar releases this client's views. Later calls
    /// raise `Unavailable`.
    fn close(&self, py: Python<'_>) {
        self.wait_for_stores(py, 1000);
        self.client.close();
    }

    /// Drops every revision of this database in the sidecar. Raises
    /// `Unavailable`.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        py.allow_threads(|| self.client.flush(&self.database)).map_err(to_py)
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
        let s = py.allow_threads(|| self.client.stats()).map_err(to_py)?;
        serde_json::to_string(&s).map_err(|e| RefusedError::new_err(e.to_string()))
    }
}

/// The native half of the `tidecache` package.
impl PyClient {
    /// This process's store queue, started on first use (and again in a
    /// forked child).
    fn queue(&self) -> std::sync::MutexGuard<'_, Option<(u32, StoreQueue)>> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let pid = std::process::id();
        if queue.as_ref().is_none_or(|(owner, _)| *owner != pid) {
            *queue = StoreQueue::start(self.config.clone(), STORE_QUEUE_CAPACITY)
                .ok()
                .map(|q| (pid, q));
        }
        queue
    }

    /// Reads `oid` at `view` from the arena straight into a new `bytes`
    /// (one copy, validated in place).
    fn read<'py>(&self, py: Python<'py>, arena: &MappedArena, slot: Slot, oid: u64, view: u64) -> PyHit<'py> {
        let found = arena.locate(slot, oid, view).ok()?;
        let state = PyBytes::new_with(py, found.len(), |buf| {
            if arena.copy(&found, buf) {
                Ok(())
            } else {
                Err(Unavailable::new_err("changed while read"))
            }
        })
        .ok()?;
        self.hit(oid, found.serial);
        Some((found.serial, state))
    }

    /// Counts a hit in the arena; every [`TOUCH_EVERY`]th is queued as a
    /// hint for the sidecar's eviction.
    fn hit(&self, oid: u64, serial: u64) {
        if self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % TOUCH_EVERY != 0 {
            return;
        }
        let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        touched.push((oid, serial));
        if touched.len() >= TOUCH_BATCH {
            let batch = std::mem::replace(&mut *touched, Vec::with_capacity(TOUCH_BATCH));
            drop(touched);
            if let Some((_, q)) = self.queue().as_ref() {
                q.touch(&self.database, batch);
            }
        }
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyClient>()?;
    let py = m.py();
    m.add("TideCacheError", py.get_type::<TideCacheError>())?;
    m.add("Unavailable", py.get_type::<Unavailable>())?;
    m.add("GapError", py.get_type::<GapError>())?;
    m.add("RefusedError", py.get_type::<RefusedError>())?;
    m.add("PROTOCOL_VERSION", tidecache_client::protocol::PROTOCOL_VERSION)?;
    Ok(())
}
