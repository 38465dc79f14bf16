//! A session's outbox: one ordered queue per [`Session`](crate::Session)
//! and process, drained by one background thread over the session's
//! connection. Reports, resyncs, the process's oldest view, stores and hit
//! hints go through it in the order they were queued, so nothing an
//! application thread calls waits on the socket, and a store of a
//! transaction's state (write-through at commit) reaches the sidecar after
//! the report of that transaction.
//!
//! Correctness does not need the caller to wait: the sidecar's horizon
//! gates what each message changes (a store past the horizon is refused, a
//! late report only costs misses, a late view only costs misses and refused
//! stores: docs/architecture.md, "Views").
//!
//! Losses are never silent for reports (invariant 4): a report that does
//! not fit in the full queue makes the *next* one queued a resync at its
//! `to` (producer side), or, if none follows before the worker finds the
//! queue empty, makes the worker resync at the newest tid lost; a report
//! answered `Gap`, or lost to an unavailable sidecar, makes the worker send
//! a resync (at once for `Gap`; otherwise in place of the next report, or
//! once reconnected with the queue empty if no report comes first).
//! Stores and hints are optional: they are dropped once the queue holds
//! all but its last [`REPORT_RESERVE`] places, which stay for reports.

use crate::protocol::StoreItem;
use crate::{Client, ClientError};
use crossbeam_channel::{bounded, Receiver, Sender, TryRecvError, TrySendError};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tidecache_core::ProcessViews;

/// Most revisions sent in one `Store` request.
pub const MAX_BATCH: usize = 256;

/// Stores and hint batches queued before a producer wakes the worker
/// thread; fewer wait for its next tick ([`STORE_TICK`]). Waking it costs
/// the producer a system call (measured: 13 us a miss from Python when
/// every store woke it); reports, resyncs, a view that went down and
/// barriers wake it at once.
pub const STORE_WAKE: usize = 64;

/// Places of the queue that stores and hit hints never take: reports,
/// resyncs and view changes still fit when a burst of misses filled the
/// rest (a report that does not fit becomes a resync, which drops the
/// database's open revisions for every process; a dropped store is only a
/// later miss).
pub const REPORT_RESERVE: usize = 256;

/// How long the worker sleeps when the queue is empty: stores queued
/// meanwhile wait at most this long (milliseconds: a store is optional and
/// only helps later reads).
pub const STORE_TICK: Duration = Duration::from_millis(10);

/// How long the remote view is kept once the process has no open view:
/// a process whose connections open and close at every request would
/// otherwise release and register it again (two round trips, and a wake
/// of this thread) at every request. Keeping it only holds the sidecar's
/// low-water mark back (memory), for at most this long.
pub const VIEW_LINGER: Duration = Duration::from_secs(1);

/// How often the counts of lookups ([`Counters::hits`],
/// [`Counters::misses`]) go to the sidecar on their own, in a `Touch`
/// without revisions, when no hint batch carried them meanwhile: the
/// host-wide counters lag a worker's own by at most this long (and a
/// barrier or [`Outbox::close`] sends them at once).
pub const COUNTS_INTERVAL: Duration = Duration::from_secs(1);

/// Most state bytes sent in one `Store` request (a batch is cut before it
/// would pass this), so that one request fits the call's timeout.
pub const MAX_BATCH_BYTES: usize = 4 << 20;

/// One queued message. Adding a kind of message is one variant here and
/// one arm in `Worker::handle`.
pub(crate) enum Msg {
    /// The invalidation report `(from, to, changes)`.
    Report {
        /// Previous tid reported.
        from: u64,
        /// This transaction's tid.
        to: u64,
        /// `(oid, tid)` of each change.
        changes: Vec<(u64, u64)>,
    },
    /// The collapsed invalidation report `(from, to, changes)`: each oid
    /// once, with its newest change in `(from, to]` or an upper bound.
    ReportCollapsed {
        /// Previous tid reported.
        from: u64,
        /// The newest tid covered.
        to: u64,
        /// `(oid, tid)` of each oid changed.
        changes: Vec<(u64, u64)>,
    },
    /// Invalidations up to `tid` were lost.
    Resync(u64),
    /// Store one revision.
    Store(StoreItem),
    /// Hit hints `(oid, serial)`.
    Touch(Vec<(u64, u64)>),
    /// The process's oldest view went down: publish it.
    Views,
    /// Answer once everything queued before it was handled.
    Barrier(Sender<()>),
    /// End the worker.
    Close,
}

/// What the worker keeps and the session reads, lock-free.
#[derive(Default)]
pub struct Counters {
    /// The horizon in the last answer that carried one.
    pub horizon: AtomicU64,
    /// Resyncs the worker sent in place of a report (a `Gap` answer, a
    /// report lost to an unavailable sidecar or to a full queue).
    pub resyncs: AtomicU64,
    /// Reports and resyncs lost to an unavailable sidecar (each makes the
    /// next report a resync).
    pub lost: AtomicU64,
    /// Lookups answered with a revision (from the arena or over the
    /// socket), counted since the session was made (in a forked child, the
    /// parent's count at the fork and the child's since): the worker sends
    /// what it has not sent yet in `Touch`.
    pub hits: AtomicU64,
    /// Lookups that went to the base storage, counted as `hits`.
    pub misses: AtomicU64,
}

impl Counters {
    /// `(hits, misses)` counted so far.
    pub fn lookups(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }
}

/// The sending side of a session's queue, and its worker thread.
pub struct Outbox {
    tx: Sender<Msg>,
    /// The worker thread, to unpark it (a system call only while it is
    /// parked).
    thread: std::thread::Thread,
    /// A report or resync did not fit in the queue: the next report queued
    /// becomes a resync at its `to`.
    lost: Arc<Overflow>,
    /// The most messages queued before stores and hints are dropped
    /// (`capacity` less [`REPORT_RESERVE`]).
    optional_limit: usize,
    /// The session's counters (resyncs queued in place of a lost report).
    counters: Arc<Counters>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Outbox {
    /// Starts the worker thread for `db` over `client` (the session's own),
    /// publishing `views`' minimum; the queue holds at most `capacity`
    /// messages. `counted`: the `(hits, misses)` of `counters` already
    /// sent, or not this process's to send (a forked child's parent's).
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub(crate) fn start(
        client: Arc<Client>,
        db: String,
        views: Arc<ProcessViews>,
        counters: Arc<Counters>,
        capacity: usize,
        counted: (u64, u64),
    ) -> std::io::Result<Self> {
        let (tx, rx) = bounded(capacity);
        let lost = Arc::new(Overflow::default());
        let worker = Worker {
            overflow: lost.clone(),
            client,
            db,
            views,
            counters: counters.clone(),
            need_resync: false,
            lost_to: 0,
            remote: None,
            empty_since: None,
            stores: Vec::new(),
            store_bytes: 0,
            touches: Vec::new(),
            sent: counted,
            counts_sent_at: Instant::now(),
        };
        let handle = std::thread::Builder::new()
            .name("tidecache-outbox".into())
            .spawn(move || worker.run(rx))?;
        Ok(Outbox {
            thread: handle.thread().clone(),
            tx,
            lost,
            optional_limit: capacity.saturating_sub(REPORT_RESERVE).max(1),
            counters,
            worker: Mutex::new(Some(handle)),
        })
    }

    fn try_send(&self, msg: Msg) -> bool {
        match self.tx.try_send(msg) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    /// Queues a message the sidecar should have soon, and wakes the worker.
    fn send_now(&self, msg: Msg) -> bool {
        let sent = self.try_send(msg);
        self.thread.unpark();
        sent
    }

    /// Queues a store or hints (dropped once the queue holds all but
    /// [`REPORT_RESERVE`] of its places); wakes the worker only once
    /// [`STORE_WAKE`] messages wait.
    fn send_later(&self, msg: Msg) -> bool {
        let sent = self.tx.len() < self.optional_limit && self.try_send(msg);
        if self.tx.len() >= STORE_WAKE {
            self.thread.unpark();
        }
        sent
    }

    /// Queues the report `(from, to, changes)`; if a report was lost to a
    /// full queue before, a resync at `to` instead. Never blocks.
    pub(crate) fn report(&self, from: u64, to: u64, changes: Vec<(u64, u64)>) {
        self.queue_report(to, Msg::Report { from, to, changes });
    }

    /// Queues the collapsed report `(from, to, changes)`; converted as
    /// [`Outbox::report`] after a loss. Never blocks.
    pub(crate) fn report_collapsed(&self, from: u64, to: u64, changes: Vec<(u64, u64)>) {
        self.queue_report(to, Msg::ReportCollapsed { from, to, changes });
    }

    /// Queues `msg`, a report up to `to`, or a resync at `to` in its place
    /// after a report lost to a full queue (counted in
    /// [`Counters::resyncs`] once queued).
    fn queue_report(&self, to: u64, msg: Msg) {
        let converted = self.lost.flag.swap(false, Ordering::AcqRel);
        let msg = if converted { Msg::Resync(to) } else { msg };
        if self.send_now(msg) {
            if converted {
                self.counters.resyncs.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            tracing::debug!(to, "queue full: the next report is a resync");
            self.lost.lose(to);
        }
    }

    /// Queues a resync at `tid`. Never blocks.
    pub(crate) fn resync(&self, tid: u64) {
        if !self.send_now(Msg::Resync(tid)) {
            self.lost.lose(tid);
        }
    }

    /// Queues one store; `false` if the queue was full and it was dropped.
    pub(crate) fn store(&self, item: StoreItem) -> bool {
        self.send_later(Msg::Store(item))
    }

    /// Queues hit hints; dropped if the queue is full.
    pub(crate) fn touch(&self, revisions: Vec<(u64, u64)>) {
        let _ = self.send_later(Msg::Touch(revisions));
    }

    /// Wakes the worker to publish the oldest view (dropped if the queue is
    /// full: the worker then reads the views after its current batch).
    pub(crate) fn wake_views(&self) {
        let _ = self.send_now(Msg::Views);
    }

    /// Waits until everything queued before this call was handled, at most
    /// `timeout`. Returns whether it finished in time.
    pub fn barrier(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (tx, rx) = bounded(1);
        self.thread.unpark();
        if self.tx.send_deadline(Msg::Barrier(tx), deadline).is_err() {
            return false;
        }
        self.thread.unpark();
        rx.recv_deadline(deadline).is_ok()
    }

    /// Drains the queue (at most `timeout`), then ends the worker: if it is
    /// still inside a call then (a hung sidecar), the session's connection
    /// is shut down under it (`Client::abort`), which ends the call. Returns
    /// once the thread has ended.
    pub(crate) fn close(&self, client: &Client, timeout: Duration) {
        let drained = self.barrier(timeout);
        if !drained {
            tracing::warn!("tidecached did not take the queued messages in time: dropping them");
            client.abort();
        }
        // The worker ends at Close, or when every sender is gone; a full
        // queue drains quickly once the connection is down.
        self.thread.unpark();
        if self.tx.send_timeout(Msg::Close, timeout).is_err() {
            client.abort();
            let _ = self.tx.send(Msg::Close);
        }
        self.thread.unpark();
        let handle = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// A report or resync that did not fit in the queue: the next report
/// queued becomes a resync at its `to`, or, if none is queued by the time
/// the worker finds the queue empty, the worker resyncs at `to` itself (the
/// sidecar's horizon would otherwise stay behind until the next commit).
#[derive(Default)]
struct Overflow {
    /// Whether a report or resync was lost to a full queue since the last
    /// resync queued or sent in its place; whoever clears it sends the resync.
    flag: AtomicBool,
    /// The newest tid lost to a full queue.
    to: AtomicU64,
}

impl Overflow {
    fn lose(&self, to: u64) {
        self.to.fetch_max(to, Ordering::AcqRel);
        self.flag.store(true, Ordering::Release);
    }
}

struct Worker {
    /// Shared with the producers' [`Outbox`].
    overflow: Arc<Overflow>,
    client: Arc<Client>,
    db: String,
    views: Arc<ProcessViews>,
    counters: Arc<Counters>,
    /// A report was lost: the next one is sent as a resync.
    need_resync: bool,
    /// The newest tid of a report or resync lost to an unavailable sidecar.
    lost_to: u64,
    /// The client's id of the one remote view, and its tid.
    remote: Option<(u64, u64)>,
    /// Since when the process has had no open view (the remote view is
    /// kept [`VIEW_LINGER`] before it is released).
    empty_since: Option<Instant>,
    stores: Vec<StoreItem>,
    store_bytes: usize,
    touches: Vec<(u64, u64)>,
    /// The `(hits, misses)` of [`Counters`] sent to the sidecar (or not
    /// this process's to send).
    sent: (u64, u64),
    /// When counts last went out.
    counts_sent_at: Instant,
}

impl Worker {
    /// Drains the queue in order, then sleeps (parked) for at most
    /// [`STORE_TICK`] unless woken: it never blocks in the channel's
    /// receive, so a producer's send never makes a system call to wake it
    /// (only an explicit unpark does).
    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            let mut n = 0;
            let mut close = false;
            let mut drained = false;
            loop {
                match rx.try_recv() {
                    Ok(msg) => {
                        close |= self.handle(msg, rx.is_empty());
                        n += 1;
                        if close || n >= MAX_BATCH {
                            break;
                        }
                    }
                    Err(TryRecvError::Empty) => {
                        drained = true;
                        break;
                    }
                    // Every sender is gone (the session was dropped).
                    Err(TryRecvError::Disconnected) => {
                        close = true;
                        break;
                    }
                }
            }
            self.send_pending();
            if close {
                break;
            }
            if drained {
                self.resync_overflow();
                self.resync_lost();
            }
            self.idle();
            if n < MAX_BATCH {
                std::thread::park_timeout(STORE_TICK);
            }
        }
        tracing::debug!(db = %self.db, "outbox worker ended");
    }

    /// Handles one message in order; `true` at `Close`.
    /// `last`: nothing was queued after `msg` when it was taken.
    fn handle(&mut self, msg: Msg, last: bool) -> bool {
        match msg {
            Msg::Store(item) => {
                if self.store_bytes + item.state.len() > MAX_BATCH_BYTES || self.stores.len() >= MAX_BATCH {
                    self.send_stores();
                }
                self.store_bytes += item.state.len();
                self.stores.push(item);
            }
            Msg::Touch(revisions) => self.touches.extend(revisions),
            Msg::Report { from, to, changes } => {
                self.send_pending();
                self.report(to, |c, db| c.report(db, from, to, changes));
            }
            Msg::ReportCollapsed { from, to, changes } => {
                self.send_pending();
                self.report(to, |c, db| c.report_collapsed(db, from, to, changes));
            }
            Msg::Resync(tid) => {
                self.send_pending();
                self.resync(tid);
            }
            Msg::Views => self.publish_views(),
            Msg::Barrier(done) => {
                self.send_pending();
                self.send_counts(true);
                self.publish_views();
                if last {
                    // Everything queued or lost before the barrier is
                    // handled before it is answered.
                    self.resync_overflow();
                }
                let _ = done.send(());
            }
            Msg::Close => {
                self.send_pending();
                self.send_counts(true);
                return true;
            }
        }
        false
    }

    /// After each batch, and when nothing was queued for a tick: reconnect
    /// if the connection is down (lookups read the arena only while
    /// connected; the client re-attaches and re-registers the view; while
    /// the sidecar stays down this fails at once), and publish the oldest
    /// view (a minimum that went up is published here).
    fn idle(&mut self) {
        if !self.client.is_connected() && self.client.is_joined(&self.db) && self.client.reconnect().is_ok() {
            tracing::debug!(db = %self.db, "reconnected from the outbox");
        }
        self.publish_views();
        self.send_counts(false);
    }

    /// The queue is empty and a report or resync that did not fit in it
    /// was not followed by another report (which would have gone out as a
    /// resync in its place): resyncs at the newest tid lost.
    fn resync_overflow(&mut self) {
        if self.overflow.flag.swap(false, Ordering::AcqRel) {
            let to = self.overflow.to.load(Ordering::Acquire);
            self.counters.resyncs.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(db = %self.db, to, "reports lost to a full queue: resyncing");
            self.send_pending();
            self.resync(to);
        }
    }

    /// The queue is empty, the connection is up again and a report or
    /// resync was lost to the unavailable sidecar: resyncs at the newest
    /// tid lost now rather than at the next report (the reconnect's own
    /// resync is at the last tid the sidecar acknowledged, so without a
    /// commit after the loss its horizon would stay behind).
    fn resync_lost(&mut self) {
        if self.need_resync && self.client.is_connected() && self.client.is_joined(&self.db) {
            self.counters.resyncs.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(db = %self.db, to = self.lost_to, "reconnected after lost reports: resyncing");
            self.send_pending();
            let to = self.lost_to;
            self.resync(to);
        }
    }

    /// Sends a report up to `to` with `send` (plain or collapsed), or a
    /// resync at `to` in its place after a loss.
    fn report(&mut self, to: u64, send: impl FnOnce(&Client, &str) -> Result<u64, ClientError>) {
        if self.need_resync {
            self.counters.resyncs.fetch_add(1, Ordering::Relaxed);
            self.resync(to);
            return;
        }
        match send(&self.client, &self.db) {
            Ok(horizon) => self.counters.horizon.store(horizon, Ordering::Relaxed),
            Err(e) if e.is_gap() => {
                // Today's sidecar horizon is before `from`: the invalidations
                // in between are unknown to it.
                self.counters.resyncs.fetch_add(1, Ordering::Relaxed);
                self.resync(to);
            }
            Err(e) => self.lost(to, e),
        }
    }

    fn resync(&mut self, tid: u64) {
        match self.client.resync(&self.db, tid) {
            Ok((_, horizon)) => {
                self.counters.horizon.store(horizon, Ordering::Relaxed);
                self.need_resync = false;
            }
            Err(e) => self.lost(tid, e),
        }
    }

    /// A report or resync up to `tid` did not reach the sidecar.
    fn lost(&mut self, tid: u64, e: ClientError) {
        match e {
            // Not joined (or forgotten after a flush elsewhere, `Stale`):
            // the next attach covers this transaction.
            ClientError::NotAttached { .. } => {}
            e if e.is_stale() => {}
            e => {
                self.counters.lost.fetch_add(1, Ordering::Relaxed);
                self.need_resync = true;
                self.lost_to = self.lost_to.max(tid);
                tracing::debug!(db = %self.db, tid, error = %e, "report lost: the next one is a resync");
            }
        }
    }

    fn send_pending(&mut self) {
        self.send_stores();
        if !self.touches.is_empty() {
            let revisions = std::mem::take(&mut self.touches);
            self.touch(revisions);
        }
    }

    /// Sends the counts of lookups not sent yet, in a `Touch` without
    /// revisions: when `now` (a barrier, closing), else once
    /// [`COUNTS_INTERVAL`] has passed since counts last went out. Only
    /// while connected (a call would reconnect otherwise); what is not
    /// sent stays counted for the next time.
    fn send_counts(&mut self, now: bool) {
        let (hits, misses) = self.counters.lookups();
        if (hits, misses) == self.sent || !self.client.is_connected() {
            return;
        }
        if now || self.counts_sent_at.elapsed() >= COUNTS_INTERVAL {
            self.touch(Vec::new());
        }
    }

    /// Sends `revisions` as hit hints, with the counts of lookups not sent
    /// yet. The counts are kept for the next `Touch` only when the sidecar
    /// did not answer (`Unavailable`); an answer, a refusal included, took
    /// them (docs/protocol.md, `Touch`).
    fn touch(&mut self, revisions: Vec<(u64, u64)>) {
        let counted = self.counters.lookups();
        let (hits, misses) = (counted.0.wrapping_sub(self.sent.0), counted.1.wrapping_sub(self.sent.1));
        self.counts_sent_at = Instant::now();
        match self.client.touch_counted(&self.db, revisions, hits, misses) {
            Ok(()) => self.sent = counted,
            Err(e @ ClientError::Unavailable { .. }) => {
                tracing::debug!(error = %e, "hit hints dropped; the counts of lookups are kept for the next time");
            }
            Err(e) => {
                self.sent = counted;
                tracing::debug!(error = %e, "hit hints refused");
            }
        }
    }

    /// Sends the pending stores, but none past the horizon the last answer
    /// carried (the sidecar would refuse them).
    fn send_stores(&mut self) {
        self.store_bytes = 0;
        if self.stores.is_empty() {
            return;
        }
        let horizon = self.counters.horizon.load(Ordering::Relaxed);
        let mut items = std::mem::take(&mut self.stores);
        items.retain(|s| s.serial <= horizon);
        if items.is_empty() {
            return;
        }
        if let Err(e) = self.client.store(&self.db, items) {
            tracing::debug!(error = %e, "stores dropped");
        }
    }

    /// Registers, moves or releases the one remote view at the process's
    /// oldest view when that changed.
    fn publish_views(&mut self) {
        let keep = self.remote.is_some() && !matches!(self.empty_since, Some(t) if t.elapsed() >= VIEW_LINGER);
        let (wanted, empty) = self.views.take_keeping(keep);
        self.empty_since = match (empty, self.empty_since) {
            (false, _) => None,
            (true, since) => Some(since.unwrap_or_else(Instant::now)),
        };
        let current = self.remote.map(|(_, t)| t);
        if wanted == current {
            return;
        }
        self.remote = match (self.remote, wanted) {
            (Some((id, _)), Some(tid)) => {
                self.client.advance_view(id, tid);
                Some((id, tid))
            }
            (None, Some(tid)) => Some((self.client.register_view(&self.db, tid), tid)),
            (Some((id, _)), None) => {
                self.client.release_view(id);
                None
            }
            (None, None) => None,
        };
    }
}
