//! A [`Client`] bound to one database, as an adapter uses it: lookups read
//! the mapped arena straight into the caller's buffer, misses are stored
//! later by a background queue, and a sample of the hits is sent as hints
//! for the sidecar's eviction, in batches.

use crate::protocol::{AttachState, Found, ServerStats, StoreItem};
use crate::{fork, Client, ClientConfig, ClientError, StoreQueue};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Stores (and hint batches) a process may have queued; more are dropped
/// (a store is optional). The queue's ring is allocated whole, about 100
/// bytes a message: 16,384 cost each worker 1.6 MB (`bench/memory.py`).
pub const STORE_QUEUE_CAPACITY: usize = 2048;

/// Hit hints handed to the store queue at once (measured: one hint per
/// message cost 2 us each, mostly waking the queue's thread; 128 per
/// message, about 20 ns per hint).
pub const TOUCH_BATCH: usize = 128;

/// One hit in this many is sent to the sidecar as a hint for eviction.
/// Measured by `bench/eviction.py` (docs/benchmarks.md): every hit, 1 in 2,
/// 4 and 8 give hit ratios of 0.844, 0.834, 0.824 and 0.818 on the Zipf
/// trace with 32 MiB; each hint costs the sidecar a chain walk, hence 2.
pub const TOUCH_EVERY: u64 = 2;

/// The result of [`Session::lookup_into`].
#[derive(Debug, Clone, PartialEq)]
pub enum Read<R> {
    /// The revision visible at the view: its serial and what the caller's
    /// `fill` made of its state.
    Hit {
        /// The revision's serial (a tid).
        serial: u64,
        /// The caller's copy of the state.
        state: R,
    },
    /// Not in the arena, or not valid there: load from the storage.
    Miss,
    /// No arena to read (not connected, not attached, file not mappable):
    /// ask over the socket ([`Session::lookup`]) or load from the storage.
    NoArena,
}

/// One process's sending side: a forked child starts its own (the parent's
/// queue thread does not exist there, and its locks may be held).
struct Senders {
    /// The process that created it ([`fork::process`]).
    pid: u32,
    /// Started on first use; `None` if the thread could not be spawned.
    queue: OnceLock<Option<StoreQueue>>,
    /// Hits to report, sent [`TOUCH_BATCH`] at a time.
    touched: Mutex<Vec<(u64, u64)>>,
}

impl Senders {
    fn new(pid: u32) -> Self {
        Senders {
            pid,
            queue: OnceLock::new(),
            touched: Mutex::new(Vec::with_capacity(TOUCH_BATCH)),
        }
    }
}

/// A [`Client`] bound to one database, with a background store queue, hit
/// sampling and hint batching. Thread-safe and fork-safe: a forked child
/// gets its own connection, queue and hit batch and never waits on a lock
/// of its parent's (the crate's fork rules).
pub struct Session {
    client: Client,
    database: String,
    config: ClientConfig,
    /// Hits so far; every [`TOUCH_EVERY`]th is reported to the sidecar.
    hits: AtomicU64,
    /// The horizon in the last answer that carried one.
    horizon: AtomicU64,
    senders: arc_swap::ArcSwap<Senders>,
}

impl Session {
    /// A session of `database` through the sidecar of `config`; connects
    /// lazily. The store queue (its own connection, a 500 ms timeout at
    /// least) starts on the first [`Session::store_later`] or hint batch.
    pub fn new(config: ClientConfig, database: impl Into<String>) -> Self {
        fork::register();
        Session {
            client: Client::new(config.clone()),
            database: database.into(),
            config,
            hits: AtomicU64::new(0),
            horizon: AtomicU64::new(0),
            senders: arc_swap::ArcSwap::from_pointee(Senders::new(fork::process())),
        }
    }

    /// The database key.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The client underneath.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The sidecar's horizon for this database as the last attach, report
    /// or resync answered it (a tid; 0 before the log starts).
    pub fn horizon(&self) -> u64 {
        self.horizon.load(Ordering::Relaxed)
    }

    /// Whether a connection to the sidecar is open now.
    pub fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    /// This process's senders: in a forked child, a fresh set; the parent's
    /// is leaked, never locked, written to or dropped here.
    fn senders(&self) -> arc_swap::Guard<Arc<Senders>> {
        let current = self.senders.load();
        let pid = fork::process();
        if current.pid == pid {
            return current;
        }
        let previous = self.senders.compare_and_swap(&*current, Arc::new(Senders::new(pid)));
        if Arc::ptr_eq(&previous, &current) {
            // Dropping the parent's queue would disconnect its channel,
            // which takes a lock its sender thread may have held at fork.
            std::mem::forget(Arc::clone(&current));
        }
        drop(previous);
        drop(current);
        self.senders.load()
    }

    fn queue<'a>(&self, senders: &'a Senders) -> Option<&'a StoreQueue> {
        senders
            .queue
            .get_or_init(|| match StoreQueue::start(self.config.clone(), STORE_QUEUE_CAPACITY) {
                Ok(q) => Some(q),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the store queue's thread: misses are not stored");
                    None
                }
            })
            .as_ref()
    }

    /// Attaches with the storage's `lastTransaction()`; see
    /// [`Client::attach`]. Keeps the horizon answered.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn attach(&self, last_tid: u64, proven: Option<u64>) -> Result<AttachState, ClientError> {
        let (state, horizon) = self.client.attach(&self.database, last_tid, proven)?;
        self.horizon.store(horizon, Ordering::Relaxed);
        Ok(state)
    }

    /// Reads the revision of `oid` visible at `view` from the mapped arena:
    /// no lock, no system call. `fill(len, copy)` makes the caller's
    /// buffer of `len` bytes and calls `copy` on it, which copies the state
    /// in and validates it (`false`: it changed while read, a miss); `fill`
    /// returns `None` for a miss. A hit is counted for the hints.
    pub fn lookup_into<R>(
        &self,
        oid: u64,
        view: u64,
        fill: impl FnOnce(usize, &mut dyn FnMut(&mut [u8]) -> bool) -> Option<R>,
    ) -> Read<R> {
        let read = self.client.with_arena(&self.database, |arena, slot| {
            let found = arena.locate(slot, oid, view).ok()?;
            let state = fill(found.len(), &mut |buf| arena.copy(&found, buf))?;
            Some((found.serial, state))
        });
        match read {
            None => Read::NoArena,
            Some(None) => Read::Miss,
            Some(Some((serial, state))) => {
                self.note_hit(oid, serial);
                Read::Hit { serial, state }
            }
        }
    }

    /// Looks up `oids` at `view`: in the mapped arena, or over the socket
    /// when there is none; one result per oid. Hits are not counted.
    ///
    /// # Errors
    /// [`ClientError`]: treat as all misses.
    pub fn lookup(&self, view: u64, oids: Vec<u64>) -> Result<Vec<Option<Found>>, ClientError> {
        self.client.lookup(&self.database, view, oids)
    }

    /// Counts a hit in the arena; every [`TOUCH_EVERY`]th is batched, and
    /// each [`TOUCH_BATCH`] queued as hints for the sidecar's eviction.
    pub fn note_hit(&self, oid: u64, serial: u64) {
        #[allow(clippy::manual_is_multiple_of)] // is_multiple_of is newer than rust-version
        if self.hits.fetch_add(1, Ordering::Relaxed) % TOUCH_EVERY != 0 {
            return;
        }
        let senders = self.senders();
        let mut touched = senders.touched.lock().unwrap_or_else(|p| p.into_inner());
        touched.push((oid, serial));
        if touched.len() >= TOUCH_BATCH {
            let batch = std::mem::replace(&mut *touched, Vec::with_capacity(TOUCH_BATCH));
            drop(touched);
            if let Some(q) = self.queue(&senders) {
                q.touch(&self.database, batch);
            }
        }
    }

    /// Stores one revision and waits for the answer; returns whether it was
    /// kept.
    ///
    /// # Errors
    /// [`ClientError`] (`Refused` when `end <= serial`).
    pub fn store(&self, item: StoreItem) -> Result<bool, ClientError> {
        let (kept, _) = self.client.store(&self.database, vec![item])?;
        Ok(kept == 1)
    }

    /// Queues a store of the revision `(oid, serial)` with `end` (`None`
    /// if it was current at `view`) for the background sender; returns
    /// `false` if the queue was full (or not running) and the store dropped.
    pub fn store_later(&self, oid: u64, serial: u64, end: Option<u64>, state: Vec<u8>, view: u64) -> bool {
        // A storage not proved to hold the sidecar's history must not store
        // into it (invariant 7): nothing before the database is joined.
        if !self.client.is_attached(&self.database) {
            return false;
        }
        let senders = self.senders();
        match self.queue(&senders) {
            Some(q) => q.push(
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

    /// Waits until this process's queued stores were sent; returns whether
    /// that happened within `timeout` (`true` when nothing was queued).
    pub fn wait_for_stores(&self, timeout: Duration) -> bool {
        let senders = self.senders();
        match senders.queue.get() {
            Some(Some(q)) => q.barrier(timeout),
            _ => true,
        }
    }

    /// Sends the invalidation report `(from, to, changes)`; see
    /// [`Client::report`]. Keeps the horizon answered.
    ///
    /// # Errors
    /// [`ClientError`]; a gap is [`ClientError::is_gap`].
    pub fn report(&self, from: u64, to: u64, changes: Vec<(u64, u64)>) -> Result<u64, ClientError> {
        let horizon = self.client.report(&self.database, from, to, changes)?;
        self.horizon.store(horizon, Ordering::Relaxed);
        Ok(horizon)
    }

    /// Sends the collapsed invalidation report `(from, to, changes)`: every
    /// oid changed in `(from, to]` with its newest change or an upper bound
    /// of it; see [`Client::report_collapsed`]. Keeps the horizon answered.
    ///
    /// # Errors
    /// [`ClientError`]; a gap is [`ClientError::is_gap`].
    pub fn report_collapsed(&self, from: u64, to: u64, changes: Vec<(u64, u64)>) -> Result<u64, ClientError> {
        let horizon = self.client.report_collapsed(&self.database, from, to, changes)?;
        self.horizon.store(horizon, Ordering::Relaxed);
        Ok(horizon)
    }

    /// Invalidations up to `tid` were lost; see [`Client::resync`]. Returns
    /// whether the sidecar's log restarted; keeps the horizon answered.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn resync(&self, tid: u64) -> Result<bool, ClientError> {
        let (restarted, horizon) = self.client.resync(&self.database, tid)?;
        self.horizon.store(horizon, Ordering::Relaxed);
        Ok(restarted)
    }

    /// Registers a view at `tid`; see [`Client::register_view`].
    pub fn register_view(&self, tid: u64) -> u64 {
        self.client.register_view(&self.database, tid)
    }

    /// Moves view `local` to `tid`; see [`Client::advance_view`].
    pub fn advance_view(&self, local: u64, tid: u64) {
        self.client.advance_view(local, tid)
    }

    /// Releases view `local`; see [`Client::release_view`].
    pub fn release_view(&self, local: u64) {
        self.client.release_view(local)
    }

    /// Waits (at most 1 s) for queued stores, then closes the connection
    /// for good; see [`Client::close`].
    pub fn close(&self) {
        self.wait_for_stores(Duration::from_secs(1));
        self.client.close();
    }

    /// Drops every revision of this database in the sidecar.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn flush(&self) -> Result<(), ClientError> {
        self.client.flush(&self.database)
    }

    /// The sidecar's counters.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn stats(&self) -> Result<ServerStats, ClientError> {
        self.client.stats()
    }
}
