//! A [`Client`] bound to one database, as an adapter uses it: lookups read
//! the mapped arena straight into the caller's buffer; reports, resyncs,
//! view changes, stores of misses and a sample of the hits (hints for the
//! sidecar's eviction) go, in order, through the session's [`Outbox`]: one
//! background thread on the session's connection. Nothing here but
//! [`Session::attach`], [`Session::flush`], [`Session::stats`],
//! [`Session::store`] and [`Session::lookup`] waits on the socket.
//!
//! # Counting lookups
//!
//! The session counts this process's lookups of its database: a *hit* is a
//! lookup answered with a revision ([`Session::lookup_into`] in the arena,
//! or [`Session::lookup`], in the arena or over the socket), a *miss* one
//! that went to the base storage (missed in the arena or over the socket,
//! failed, or [`Session::note_miss`] for a load that did not ask).
//! [`Session::peek_into`] (a prefetch's probe) counts nothing. Counting
//! is one relaxed atomic add on the lookup's path (a hit's was there
//! already, for the hint sampling). The outbox sends the counts not sent
//! yet in `Touch` with each batch of hit hints, on their own every
//! [`crate::outbox::COUNTS_INTERVAL`] while connected, and at once on a
//! barrier ([`Session::wait_for_stores`], [`Session::send_counts`]) and on
//! [`Session::close`]: the sidecar's per-database `hits` and `misses` are
//! the sums over every process of the host.

use crate::outbox::{Counters, Outbox};
use crate::protocol::{AttachState, Found, ServerStats, StoreItem};
use crate::{fork, Client, ClientConfig, ClientError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tidecache_core::{Change, ProcessViews};

/// Messages a session's outbox may hold (reports, resyncs, stores, hint
/// batches, view wakes); stores and hints are dropped (they are optional)
/// once all but [`crate::outbox::REPORT_RESERVE`] places are taken, a report that does not fit makes the next one a resync. The
/// queue's ring is allocated whole, about 100 bytes a message: 16,384 cost
/// each worker 1.6 MB (`bench/memory.py`).
pub const STORE_QUEUE_CAPACITY: usize = 2048;

/// How long [`Session::close`] waits for the outbox to drain before it
/// drops what is left.
pub const CLOSE_DRAIN: Duration = Duration::from_secs(1);

/// Hit hints handed to the outbox at once (measured: one hint per
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
/// outbox thread does not exist there, and its locks may be held), with no
/// views (the parent's are not the child's) and view ids that continue
/// after the parent's.
struct Senders {
    /// The process that created it ([`fork::process`]).
    pid: u32,
    /// Started on first use; `None` if the thread could not be spawned.
    queue: OnceLock<Option<Outbox>>,
    /// This process's open views of the database.
    views: Arc<ProcessViews>,
    /// Hits to report, sent [`TOUCH_BATCH`] at a time.
    touched: Mutex<Vec<(u64, u64)>>,
    /// The newest `to` of a report queued: stores up to it may be kept
    /// once the report is answered.
    queued_to: AtomicU64,
    /// The session's `(hits, misses)` when this process's senders were
    /// made: in a forked child, the parent's (its to send), so the child
    /// sends only its own.
    counted: (u64, u64),
}

impl Senders {
    fn new(pid: u32, last_view_id: u64, counted: (u64, u64)) -> Self {
        Senders {
            pid,
            queue: OnceLock::new(),
            views: Arc::new(ProcessViews::starting_after(last_view_id)),
            touched: Mutex::new(Vec::with_capacity(TOUCH_BATCH)),
            queued_to: AtomicU64::new(0),
            counted,
        }
    }
}

/// A [`Client`] bound to one database, with its outbox (one background thread), hit
/// sampling and hint batching. Thread-safe and fork-safe: a forked child
/// gets its own connection, queue and hit batch and never waits on a lock
/// of its parent's (the crate's fork rules).
pub struct Session {
    client: Arc<Client>,
    database: String,
    /// The horizon in the last answer that carried one (the outbox's
    /// answers included), the outbox's counters, and the lookups counted
    /// (every [`TOUCH_EVERY`]th hit in the arena is sent as a hint).
    counters: Arc<Counters>,
    /// The largest state the arena can keep (bytes; 0: not known yet).
    largest_state: AtomicU64,
    senders: arc_swap::ArcSwap<Senders>,
}

impl Session {
    /// A session of `database` through the sidecar of `config`; connects
    /// lazily. The outbox's thread starts on the first message queued.
    pub fn new(config: ClientConfig, database: impl Into<String>) -> Self {
        fork::register();
        Session {
            client: Arc::new(Client::new(config)),
            database: database.into(),
            counters: Arc::new(Counters::default()),
            largest_state: AtomicU64::new(0),
            senders: arc_swap::ArcSwap::from_pointee(Senders::new(fork::process(), 0, (0, 0))),
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
    /// or resync answered it, queued ones included (a tid; 0 before the
    /// log starts).
    pub fn horizon(&self) -> u64 {
        self.counters.horizon.load(Ordering::Relaxed)
    }

    /// `(resyncs, lost)`: resyncs the outbox sent in place of a report (a
    /// `Gap` answer, a report lost before), and reports or resyncs lost to
    /// an unavailable sidecar.
    pub fn outbox_counts(&self) -> (u64, u64) {
        (
            self.counters.resyncs.load(Ordering::Relaxed),
            self.counters.lost.load(Ordering::Relaxed),
        )
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
        // Counted until now: the parent's (a few of this child's before its
        // first call here are left out; never counted twice).
        let fresh = Senders::new(pid, current.views.last_id(), self.counters.lookups());
        let previous = self.senders.compare_and_swap(&*current, Arc::new(fresh));
        if Arc::ptr_eq(&previous, &current) {
            // Dropping the parent's queue would disconnect its channel,
            // which takes a lock its sender thread may have held at fork.
            std::mem::forget(Arc::clone(&current));
        }
        drop(previous);
        drop(current);
        self.senders.load()
    }

    fn queue<'a>(&self, senders: &'a Senders) -> Option<&'a Outbox> {
        senders
            .queue
            .get_or_init(|| {
                match Outbox::start(
                    self.client.clone(),
                    self.database.clone(),
                    senders.views.clone(),
                    self.counters.clone(),
                    STORE_QUEUE_CAPACITY,
                    senders.counted,
                ) {
                    Ok(q) => Some(q),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start the outbox's thread: nothing is reported or stored");
                        None
                    }
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
        self.counters.horizon.store(horizon, Ordering::Relaxed);
        let largest = self
            .client
            .with_arena(&self.database, |arena, _| arena.max_state_bytes());
        if let Some(largest) = largest {
            self.largest_state.store(largest as u64, Ordering::Relaxed);
        }
        Ok(state)
    }

    /// Reads the revision of `oid` visible at `view` from the mapped arena:
    /// no lock, no system call. `fill(len, copy)` makes the caller's
    /// buffer of `len` bytes and calls `copy` on it, which copies the state
    /// in and validates it (`false`: it changed while read, a miss); `fill`
    /// returns `None` for a miss. A hit is counted, and sampled for the
    /// hints ([`Session::note_hit`]); a miss is counted
    /// ([`Session::note_miss`]): the caller loads from its storage.
    /// `NoArena` is not counted: the caller asks over the socket
    /// ([`Session::lookup`], which counts) or notes its miss.
    pub fn lookup_into<R>(
        &self,
        oid: u64,
        view: u64,
        fill: impl FnOnce(usize, &mut dyn FnMut(&mut [u8]) -> bool) -> Option<R>,
    ) -> Read<R> {
        match self.read_into(oid, view, fill) {
            Read::Hit { serial, state } => {
                self.note_hit(oid, serial);
                Read::Hit { serial, state }
            }
            Read::Miss => {
                self.note_miss(1);
                Read::Miss
            }
            Read::NoArena => Read::NoArena,
        }
    }

    /// [`Session::lookup_into`] that counts nothing and sends no hint: a
    /// probe (a prefetch), whose loads will look up again.
    pub fn peek_into<R>(
        &self,
        oid: u64,
        view: u64,
        fill: impl FnOnce(usize, &mut dyn FnMut(&mut [u8]) -> bool) -> Option<R>,
    ) -> Read<R> {
        self.read_into(oid, view, fill)
    }

    fn read_into<R>(
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
            Some(Some((serial, state))) => Read::Hit { serial, state },
        }
    }

    /// Looks up `oids` at `view`: in the mapped arena, or over the socket
    /// when there is none; one result per oid. Each is counted, a hit or a
    /// miss; an error counts every oid a miss (the caller loads them from
    /// its storage). No hints are sent.
    ///
    /// # Errors
    /// [`ClientError`]: treat as all misses.
    pub fn lookup(&self, view: u64, oids: Vec<u64>) -> Result<Vec<Option<Found>>, ClientError> {
        let n = oids.len() as u64;
        let found = self.client.lookup(&self.database, view, oids);
        match &found {
            Ok(results) => {
                let hits = results.iter().filter(|r| r.is_some()).count() as u64;
                self.counters.hits.fetch_add(hits, Ordering::Relaxed);
                self.note_miss(n - hits);
            }
            Err(_) => self.note_miss(n),
        }
        found
    }

    /// [`Session::lookup`] that counts nothing: a probe (a prefetch).
    ///
    /// # Errors
    /// [`ClientError`]: treat as all misses.
    pub fn peek(&self, view: u64, oids: Vec<u64>) -> Result<Vec<Option<Found>>, ClientError> {
        self.client.lookup(&self.database, view, oids)
    }

    /// Counts `n` lookups that went to the base storage: what
    /// [`Session::lookup_into`] and [`Session::lookup`] count themselves,
    /// and what an adapter counts when it loads from its storage without
    /// asking (no arena and no connection to ask over, a state a prefetch
    /// loaded). One relaxed atomic add.
    pub fn note_miss(&self, n: u64) {
        self.counters.misses.fetch_add(n, Ordering::Relaxed);
    }

    /// This process's lookups counted so far, `(hits, misses)` (see the
    /// module's "Counting lookups"), sent or not.
    pub fn lookups(&self) -> (u64, u64) {
        self.counters.lookups()
    }

    /// Sends the counts of lookups not sent yet now, with everything queued
    /// before (a barrier of the outbox, started if it was not); returns
    /// whether that happened within `timeout`. Counts are sent only while
    /// connected: `false` also when the sidecar is unavailable (they stay
    /// counted for the next time).
    pub fn send_counts(&self, timeout: Duration) -> bool {
        let senders = self.senders();
        match self.queue(&senders) {
            Some(q) => q.barrier(timeout) && self.client.is_connected(),
            None => false,
        }
    }

    /// Counts a hit in the arena; every [`TOUCH_EVERY`]th is batched, and
    /// each [`TOUCH_BATCH`] queued as hints for the sidecar's eviction.
    pub fn note_hit(&self, oid: u64, serial: u64) {
        #[allow(clippy::manual_is_multiple_of)] // is_multiple_of is newer than rust-version
        if self.counters.hits.fetch_add(1, Ordering::Relaxed) % TOUCH_EVERY != 0 {
            return;
        }
        let senders = self.senders();
        let mut touched = senders.touched.lock().unwrap_or_else(|p| p.into_inner());
        touched.push((oid, serial));
        if touched.len() >= TOUCH_BATCH {
            let batch = std::mem::replace(&mut *touched, Vec::with_capacity(TOUCH_BATCH));
            drop(touched);
            if let Some(q) = self.queue(&senders) {
                q.touch(batch);
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
    /// if it was current at `view`) for the outbox; returns `false` if it
    /// was not queued: the database is not joined (invariant 7), `serial`
    /// is past the horizon the session knows (answered, or of a report
    /// queued before: the sidecar would refuse it), the state is larger
    /// than the arena's largest, or the queue is full.
    pub fn store_later(&self, oid: u64, serial: u64, end: Option<u64>, state: Vec<u8>, view: u64) -> bool {
        // A storage not proved to hold the sidecar's history must not store
        // into it (invariant 7): nothing before the database is joined.
        if !self.client.is_attached(&self.database) {
            return false;
        }
        let largest = self.largest_state.load(Ordering::Relaxed);
        if largest != 0 && state.len() as u64 > largest {
            return false;
        }
        let senders = self.senders();
        let known = self.horizon().max(senders.queued_to.load(Ordering::Relaxed));
        if serial > known {
            return false;
        }
        match self.queue(&senders) {
            Some(q) => q.store(StoreItem {
                oid,
                serial,
                end,
                view,
                state,
            }),
            None => false,
        }
    }

    /// Waits until everything this process queued before (reports, view
    /// changes and stores) was handled; returns whether that happened
    /// within `timeout` (`true` when nothing was ever queued).
    pub fn wait_for_stores(&self, timeout: Duration) -> bool {
        let senders = self.senders();
        match senders.queue.get() {
            Some(Some(q)) => q.barrier(timeout),
            _ => true,
        }
    }

    /// Queues the invalidation report `(from, to, changes)` and returns at
    /// once; the outbox sends it in order (see [`Client::report`]). A
    /// report answered `Gap`, or lost (an unavailable sidecar, a full
    /// queue), is followed by a resync: never silently dropped
    /// (invariant 4). The horizon answered is kept ([`Session::horizon`]).
    pub fn report(&self, from: u64, to: u64, changes: Vec<(u64, u64)>) {
        let senders = self.senders();
        senders.queued_to.fetch_max(to, Ordering::Relaxed);
        if let Some(q) = self.queue(&senders) {
            q.report(from, to, changes);
        }
    }

    /// Queues a resync at `tid` (invalidations up to `tid` were lost) and
    /// returns at once; see [`Client::resync`].
    pub fn resync(&self, tid: u64) {
        let senders = self.senders();
        senders.queued_to.fetch_max(tid, Ordering::Relaxed);
        if let Some(q) = self.queue(&senders) {
            q.resync(tid);
        }
    }

    /// Sends the report now and waits for the answer (tools and tests; an
    /// adapter queues with [`Session::report`]). Returns the horizon.
    ///
    /// # Errors
    /// [`ClientError`]; a gap is [`ClientError::is_gap`].
    pub fn report_now(&self, from: u64, to: u64, changes: Vec<(u64, u64)>) -> Result<u64, ClientError> {
        let horizon = self.client.report(&self.database, from, to, changes)?;
        self.counters.horizon.store(horizon, Ordering::Relaxed);
        Ok(horizon)
    }

    /// Queues the collapsed invalidation report `(from, to, changes)` (every
    /// oid changed in `(from, to]` with its newest change or an upper bound
    /// of it; see [`Client::report_collapsed`]) and returns at once; sent in
    /// order, followed by a resync if answered `Gap` or lost, as
    /// [`Session::report`].
    pub fn report_collapsed(&self, from: u64, to: u64, changes: Vec<(u64, u64)>) {
        let senders = self.senders();
        senders.queued_to.fetch_max(to, Ordering::Relaxed);
        if let Some(q) = self.queue(&senders) {
            q.report_collapsed(from, to, changes);
        }
    }

    /// Sends the collapsed report now and waits for the answer (tools and
    /// tests). Returns the horizon.
    ///
    /// # Errors
    /// [`ClientError`]; a gap is [`ClientError::is_gap`].
    pub fn report_collapsed_now(&self, from: u64, to: u64, changes: Vec<(u64, u64)>) -> Result<u64, ClientError> {
        let horizon = self.client.report_collapsed(&self.database, from, to, changes)?;
        self.counters.horizon.store(horizon, Ordering::Relaxed);
        Ok(horizon)
    }

    /// Opens a view at `tid` and returns its id: kept in the process; the
    /// outbox registers the process's oldest view with the sidecar. No
    /// system call unless the oldest view went down.
    pub fn register_view(&self, tid: u64) -> u64 {
        let senders = self.senders();
        let (id, change) = senders.views.register(tid);
        self.wake_if(&senders, change);
        id
    }

    /// The oldest view this process has open now (a tid), `None` when it
    /// has none: the low-water mark of the process's own connections,
    /// which the in-process template cache of the Python adapter reclaims
    /// below (invariant 5). No system call.
    pub fn lowest_view(&self) -> Option<u64> {
        self.senders().views.minimum()
    }

    /// Moves view `id` to `tid` (an unknown id is ignored). No system call
    /// unless the oldest view went down.
    pub fn advance_view(&self, id: u64, tid: u64) {
        let senders = self.senders();
        let change = senders.views.advance(id, tid);
        self.wake_if(&senders, change);
    }

    /// Closes view `id` (an unknown id is ignored). No system call: the
    /// outbox moves the remote view up when it next wakes.
    pub fn release_view(&self, id: u64) {
        self.senders().views.release(id);
    }

    /// Asks the outbox to reconnect if the connection is down and the
    /// database joined (what a lookup that found no arena calls: the
    /// caller misses now, and reads the arena again once connected). No
    /// system call when connected.
    pub fn reconnect_later(&self) {
        if !self.client.is_connected() && self.client.is_joined(&self.database) {
            let senders = self.senders();
            if let Some(q) = self.queue(&senders) {
                q.wake_views();
            }
        }
    }

    fn wake_if(&self, senders: &Senders, change: Change) {
        if change == Change::Wake {
            if let Some(q) = self.queue(senders) {
                q.wake_views();
            }
        }
    }

    /// Drains the outbox (at most [`CLOSE_DRAIN`]), sends the counts of
    /// lookups not sent yet (while connected), and ends its thread, then
    /// closes the connection for good; see [`Client::close`]. Nothing of
    /// this session runs afterwards.
    pub fn close(&self) {
        let senders = self.senders();
        if let Some(Some(q)) = senders.queue.get() {
            q.close(&self.client, CLOSE_DRAIN);
        } else if self.client.is_connected() {
            // No outbox ever started (nothing was queued): the counts go
            // out from here.
            let (hits, misses) = self.counters.lookups();
            let (hits, misses) = (
                hits.wrapping_sub(senders.counted.0),
                misses.wrapping_sub(senders.counted.1),
            );
            if hits + misses > 0 {
                let _ = self.client.touch_counted(&self.database, Vec::new(), hits, misses);
            }
        }
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
