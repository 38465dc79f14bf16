"""``TideCacheStorage``: a ZODB storage wrapper that serves connections'
loads from the ``tidecached`` sidecar.

The wrapper is both a plain storage (every ``IStorage`` method goes to the
base storage, as ``zc.zlibstorage`` does) and an ``IMVCCStorage``: it is
ZODB's own ``MVCCAdapter`` (``ZODB/mvccadapter.py``) with four additions:

- each connection's view (``_start - 1``) is registered with the sidecar by
  ``poll_invalidations`` and released by ``release``;
- ``load`` looks the oid up in the sidecar at the connection's view; a miss
  loads ``loadBefore(oid, _start)`` from the base storage and queues a store
  of the revision (closed if ``loadBefore`` gave an end, open otherwise);
- every commit this process sees -- its own (``tpc_finish``, through a
  connection, an undo or the storage API) and other processes' (ZEO's
  ``invalidateTransaction``) -- is reported with its exact tid as the
  invalidation report ``(previous tid, tid, [(oid, tid), ...])``;
- ``invalidateCache`` (ZEO lost invalidations) makes the next report a
  ``resync`` (the client itself resyncs after a refused or lost report):
  the sidecar drops its open revisions rather than guess;
- a commit writes its states through: after ``tpc_finish`` queued the
  report of its tid, each state the transaction stored (not blobs, not
  conflict-resolved ones) is queued as an open revision at that tid.

Reports, resyncs, views and stores only queue: the client's background
thread sends them, in order, so no application thread waits on the socket.

If the sidecar is absent, dead or slow, every lookup is a miss and the
application runs from its base storage (invariant 8 of docs/invariants.md).
"""

import logging
import os
import threading
import time
import weakref

import zope.interface
from ZODB import POSException
from ZODB.interfaces import IMVCCStorage
from ZODB.mvccadapter import MVCCAdapter
from ZODB.mvccadapter import MVCCAdapterInstance
from ZODB.utils import oid_repr
from ZODB.utils import p64
from ZODB.utils import tid_repr
from ZODB.utils import u64

from tidecache._native import Client
from tidecache._native import TideCacheError
from tidecache._native import Unavailable

logger = logging.getLogger("tidecache")

#: How long a storage whose ``lastTransaction`` is below the sidecar's
#: horizon may take to catch up before it is taken for a restored backup.
RESTORE_GRACE_SECONDS = 2.0

#: Transactions per report while catching the sidecar up from the storage's
#: iterator (after a sidecar restart).
CATCH_UP_CHUNK = 1000

#: Proofs tried in a row while the sidecar's horizon keeps moving (other
#: processes commit meanwhile); past them the attach is retried later.
PROOF_ATTEMPTS = 5

#: Seconds between attach retries (from ``poll_invalidations``) while this
#: storage is not joined to its database in the sidecar; after an attempt
#: that found the sidecar unavailable (which costs nothing: the client
#: fails at once while it waits to reconnect), ``RETRY_UNAVAILABLE``.
REJOIN_INTERVAL = 1.0
RETRY_UNAVAILABLE = 0.25

_STAT_KEYS = ("hits", "misses", "stores", "invalidations", "resyncs", "unavailable", "proofs", "flushes")

#: Live storages, for the fork hook below.
_live = weakref.WeakSet()


def _after_fork_in_child():
    """``os.register_at_fork(after_in_child=...)``: a child forked while
    another thread of the parent held a storage's locks (a ZEO or catch-up
    thread inside a report) copies them locked, and that thread does not
    exist here. Each live storage gets new locks; see
    ``TideCacheStorage._tc_after_fork``.

    Every storage is renewed whatever happens to another: Python stops this
    hook at its first exception (and only prints it), so one storage that
    cannot be renewed would leave the others, in an order nobody chooses
    (the set's), with their parent's held locks, and the child would hang
    on the first of them it uses."""
    for storage in list(_live):
        try:
            storage._tc_after_fork()
        except Exception:
            logger.exception("tidecache: cannot renew the locks of %s in a forked child; "
                             "its next call may wait forever: report this as a bug",
                             object.__repr__(storage))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def database_key(base):
    """The key naming ``base``'s database in the sidecar (invariant 7).

    ZEO ``ClientStorage``: ``zeo:<address>:<storage name>``; FileStorage:
    ``file:<absolute path>``; any other storage: ``<class>:<getName()>``,
    with the process id for in-memory storages (``MappingStorage``,
    ``DemoStorage``) that no other process can share. Pass ``database=`` to
    ``TideCacheStorage`` where two spellings name one database (two
    addresses of one ZEO server).
    """
    cls = type(base).__name__
    if hasattr(base, "_server_addr") or cls == "ClientStorage":
        return "zeo:%s:%s" % (getattr(base, "_addr", "?"), getattr(base, "_storage", "1"))
    file_name = getattr(base, "_file_name", None)
    if file_name:
        return "file:" + os.path.abspath(file_name)
    name = base.getName() if hasattr(base, "getName") else repr(base)
    if cls in ("MappingStorage", "DemoStorage"):
        return "%s:%s:pid %d:%x" % (cls, name, os.getpid(), id(base))
    return "%s:%s" % (cls, name)


class _Stats:
    """Counters of one storage; ``+=`` under the GIL is good enough for
    statistics."""

    def __init__(self):
        for k in _STAT_KEYS:
            setattr(self, k, 0)

    def as_dict(self):
        return {k: getattr(self, k) for k in _STAT_KEYS}


@zope.interface.implementer(IMVCCStorage)
class TideCacheStorage(MVCCAdapter):
    """Wraps ``base`` (any ZODB storage) and caches its revisions in the
    ``tidecached`` sidecar listening on ``socket``.

    :param base: the storage that holds the data: FileStorage,
        MappingStorage, ZEO ClientStorage, ...
    :param socket: path of the sidecar's Unix socket.
    :param database: the database's key in the sidecar; default
        :func:`database_key` of ``base``.
    :param timeout_ms: bound on each call to the sidecar, milliseconds;
        past it the call is a miss.
    """

    def __init__(self, base, socket, database=None, timeout_ms=50):
        if IMVCCStorage.providedBy(base):
            raise TypeError(
                "TideCacheStorage wraps storages that ZODB adapts with MVCCAdapter "
                "(FileStorage, MappingStorage, ZEO ClientStorage); %r is an IMVCCStorage "
                "(RelStorage?), which it does not support yet" % (base,))
        self._tc_socket = socket
        self._tc_client = Client(socket, database or database_key(base), timeout_ms)
        self._tc_stats = _Stats()
        self._tc_lock = threading.Lock()
        # Only one attach (with its proof) at a time; a retry never waits.
        self._tc_join_lock = threading.Lock()
        # Whether an attach was answered "started" or "joined": until then
        # nothing is reported, stored or looked up (invariant 7).
        self._tc_joined = False
        self._tc_next_join = 0.0
        self._tc_behind_since = None
        self._tc_unavailable = False
        # The newest tid reported (or skipped while not joined); None until
        # the first attach.
        self._tc_reported = None
        self._tc_resync = False
        self._tc_generation = None
        # While attaching, and while the sidecar's horizon is filled in from
        # the storage's iterator (after a sidecar restart), live reports
        # wait here.
        self._tc_held = []
        self._tc_direct = {}
        _live.add(self)
        for iface in zope.interface.providedBy(base):
            zope.interface.alsoProvides(self, iface)
        # Calls base.registerDB(self): base's invalidations come here from now
        # on. lastTransaction is read after that, so no transaction falls
        # between the two (ZODB >= 5.6: lastTransaction moves only after its
        # invalidations were delivered); those delivered meanwhile are held
        # and reported in order after the attach.
        MVCCAdapter.__init__(self, base)
        with self._tc_join_lock:
            self._tc_join(wait=True)

    def _tc_join(self, wait):
        """Attaches to the sidecar (with a proof, :meth:`_tc_attach`) at the
        newest tid this storage has: its ``lastTransaction``, or a newer tid
        already delivered. Live reports are held meanwhile; once attached,
        a sidecar whose horizon is behind is caught up from the storage's
        iterator (:meth:`_tc_catch_up`), then the held reports are sent.
        Called with ``_tc_join_lock`` held, and with ``_tc_held`` a list."""
        base = self._storage
        with self._tc_lock:
            generation = self._tc_connection_generation()
            # Everything up to the tid attached at is covered by the attach
            # (and the catch-up): the flag of the time before is obsolete.
            self._tc_resync = False
            known = self._tc_reported or 0
        last = max(u64(base.lastTransaction()), known)
        last, joined = self._tc_attach(base, last, wait)
        horizon = self._tc_client.horizon
        if joined:
            # Joined in the sidecar; reports stay held until the catch-up
            # (if any) is done. A child forked meanwhile (whose catch-up
            # thread is gone) is joined and resyncs (``_tc_after_fork``).
            with self._tc_lock:
                self._tc_joined = True
                self._tc_reported = max(last, self._tc_reported or 0)
                self._tc_generation = generation
        if joined and 0 < horizon < last:
            self._tc_catch_up(base, horizon, last, generation)
        else:
            self._tc_release(last, generation, joined)

    def _tc_release(self, last, generation, joined, resync=False):
        """Ends an attach (and its catch-up) at ``last``: reports held
        meanwhile that are newer are sent."""
        with self._tc_lock:
            self._tc_joined = joined
            self._tc_reported = max(last, self._tc_reported or 0)
            self._tc_generation = generation
            self._tc_resync = self._tc_resync or resync
            held, self._tc_held = self._tc_held, None
            for t, oids in held or ():
                self._tc_report_locked(t, oids)

    def _tc_rejoin(self):
        """Attaches again if the first attach never joined (the sidecar was
        unavailable, or its horizon kept moving during the proof): at most
        once per ``REJOIN_INTERVAL``, from a connection's poll, never
        waiting for another thread's attempt."""
        now = time.monotonic()
        if now < self._tc_next_join or not self._tc_join_lock.acquire(blocking=False):
            return
        try:
            self._tc_next_join = now + REJOIN_INTERVAL
            with self._tc_lock:
                if self._tc_joined or self._tc_held is not None:
                    return
                self._tc_held = []
            self._tc_join(wait=False)
            if self._tc_unavailable:
                self._tc_next_join = time.monotonic() + RETRY_UNAVAILABLE
        except Exception:  # never let a retry break a connection's poll
            logger.exception("tidecache: attaching %s again failed", self._tc_client.database)
            with self._tc_lock:
                if self._tc_held is not None and not self._tc_joined:
                    held, self._tc_held = self._tc_held, None
                    for t, oids in held:
                        self._tc_report_locked(t, oids)
        finally:
            self._tc_join_lock.release()

    def _tc_attach(self, base, last, wait):
        """Attaches to the sidecar at ``last`` and returns ``(last, joined)``:
        the tid attached at and whether the database is joined ("started"
        or "joined").

        Below the sidecar's horizon, the storage either lags (a ZEO client
        that has not yet heard of commits another process reported) or was
        restored from a backup. With ``wait`` it is polled for up to
        ``RESTORE_GRACE_SECONDS``; if it catches up, it goes on; if not, the
        database is flushed in the sidecar before anything is served from it
        (invariant 7 of docs/invariants.md). Without ``wait`` (a retry), it stays not
        joined until a later retry, the grace counted from the first.

        At or past the horizon, the sidecar asks for a proof that this
        storage's history holds its horizon transaction (:meth:`_tc_prove`);
        a failed proof flushes the database (a backup restored and
        committed to since, another file at the same path)."""
        client = self._tc_client
        self._tc_unavailable = False
        try:
            try:
                state = client.attach(last)
            except Unavailable as e:
                # A sidecar that answers slowly (a busy host) is tried once
                # more at start, after the client's wait before reconnecting;
                # an absent one (refused connect) is not waited for.
                if not wait or "connect:" in str(e):
                    raise
                time.sleep(RETRY_UNAVAILABLE + 0.01)
                state = client.attach(last)
            deadline = time.monotonic() + RESTORE_GRACE_SECONDS
            while state == "behind" and wait and time.monotonic() < deadline:
                time.sleep(0.02)
                sync = getattr(base, "sync", None)
                if sync is not None:
                    sync()
                last = max(last, u64(base.lastTransaction()))
                state = client.attach(last)
            if state == "behind" and not wait:
                since = self._tc_behind_since or time.monotonic()
                self._tc_behind_since = since
                if time.monotonic() - since < RESTORE_GRACE_SECONDS:
                    return last, False
            if state == "behind":
                logger.warning(
                    "tidecache: %s's lastTransaction %s stays below the sidecar's horizon %s: "
                    "restored from a backup? Flushing the database in the sidecar.",
                    client.database, tid_repr(p64(last)), tid_repr(p64(client.horizon)))
                self._tc_flush()
                state = client.attach(last)
            self._tc_behind_since = None
            attempts = 0
            while state == "prove" and attempts < PROOF_ATTEMPTS:
                attempts += 1
                horizon, witness, sample = client.proof
                proved, how = self._tc_prove(base, horizon, witness, sample)
                self._tc_stats.proofs += 1
                if proved:
                    logger.info("tidecache: %s holds the sidecar's horizon %s (proved by %s)",
                                client.database, tid_repr(p64(horizon)), how)
                    state = client.attach(last, horizon)
                else:
                    logger.warning(
                        "tidecache: %s does not hold the sidecar's horizon transaction %s (%s): "
                        "another history (a restored backup committed to since, another file at "
                        "the same path?). Flushing the database in the sidecar.",
                        client.database, tid_repr(p64(horizon)), how)
                    self._tc_flush()
                    state = client.attach(last)
            logger.info("tidecache: %s attached to %s (%s) at %s", client.database, self._tc_socket,
                        state, tid_repr(p64(last)))
            if state not in ("started", "joined"):
                logger.info("tidecache: %s not joined yet (%s); running from the base storage, "
                            "retrying later", client.database, state)
            return last, state in ("started", "joined")
        except TideCacheError as e:
            # A retry (not waiting) while the sidecar is down says so once,
            # at the first attach.
            (logger.warning if wait else logger.debug)(
                "tidecache: sidecar unavailable, running from the base storage: %s", e)
            self._tc_unavailable = True
            return last, False

    def _tc_after_fork(self):
        """In a forked child (gunicorn ``--preload``, uwsgi): new locks in
        place of the parent's, which a thread of the parent's may have held
        (the native client does the same for its own). If a report was in
        flight then (the lock was held) or a catch-up was running (its
        thread is not here, its held reports would wait forever), whether the
        sidecar got those transactions is unknown: the next report is a
        resync."""
        in_flight = self._tc_lock.locked() or self._tc_held is not None
        self._tc_lock = threading.Lock()
        self._tc_join_lock = threading.Lock()
        # ZODB's MVCCAdapter guards _instances with _lock, and each
        # instance its invalidations with its own _lock. A storage that
        # another thread of the parent was closing at the fork
        # (MVCCAdapter.close deletes _instances and _storage), or was still
        # constructing, has no _instances, and ``self._instances`` would go
        # to __getattr__, which raises: read the instance dictionary.
        self._lock = threading.Lock()
        for instance in list(self.__dict__.get("_instances", ())):
            instance._lock = threading.Lock()
        if in_flight:
            self._tc_held = None
            self._tc_resync = True

    def _tc_flush(self):
        self._tc_stats.flushes += 1
        self._tc_client.flush()

    def _tc_prove(self, base, horizon, witness, sample):
        """Whether ``base`` provably holds the sidecar's horizon transaction
        ``horizon`` (invariant 7); returns ``(proved, how)``.

        (a) The storage has a transaction with tid exactly ``horizon``: for
        each ``witness`` oid (changed at ``horizon``), ``loadBefore(oid,
        horizon + 1)`` returns serial ``horizon``; with no witness, the
        storage's iterator yields a transaction with tid ``horizon`` that no
        pack has rewritten (status ``"p"``). (b) For each ``(oid, serial)`` of
        ``sample`` (open revisions the sidecar holds), ``loadBefore(oid,
        horizon + 1)`` returns ``serial``.

        Tids are timestamps, unique to a history: a storage that holds the
        transaction ``horizon`` holds the history up to it. Where (a) cannot
        be done (no witness, and no iterator), (b) alone is used, which is
        weaker: it proves the newest open revisions the sidecar serves are
        this storage's, which catches a restored backup, but not another
        file whose history shares those revisions. With nothing to check at
        all, it is not proved. Any error, ``None`` or mismatch is no proof."""

        def serial_at(oid):
            r = base.loadBefore(p64(oid), p64(horizon + 1))
            return None if r is None else u64(r[1])

        try:
            if witness:
                how = "the horizon transaction's oids"
                proved = all(serial_at(o) == horizon for o in witness)
            else:
                has = self._tc_has_transaction(base, horizon)
                if has is None:
                    if not sample:
                        return False, "no witness, no iterator, no open revision to check"
                    how = "the open revisions only (weaker: no witness, no iterator)"
                    proved = True
                else:
                    how = "the transaction iterator"
                    proved = has
            if proved and sample:
                proved = all(serial_at(o) == s for o, s in sample)
            return proved, how
        except Exception as e:
            return False, "the proof failed: %r" % (e,)

    @staticmethod
    def _tc_has_transaction(base, tid):
        """Whether ``base``'s iterator has an unpacked transaction with tid
        exactly ``tid``; ``None`` if the storage cannot iterate."""
        iterator = getattr(base, "iterator", None)
        if iterator is None:
            return None
        try:
            it = iterator(p64(tid), p64(tid))
        except NotImplementedError:
            return None
        try:
            for txn in it:
                return u64(txn.tid) == tid and getattr(txn, "status", " ") != "p"
            return False
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def _tc_catch_up(self, base, horizon, last, generation):
        """The sidecar's horizon is behind this storage (it restarted and
        re-attached its arena file, or other processes have not reported
        yet): reports ``(horizon, last]`` from the storage's transaction
        iterator, in a background thread and in chunks, so the sidecar's
        open revisions answer again without waiting; live reports are held
        meanwhile and sent after. A storage without an iterator, an iterator
        that fails, or one whose range was packed (another process packed
        the storage: transactions before the pack time lost their superseded
        records, or disappeared, and those left carry status ``"p"``; their
        changes are no longer exact) gets a resync instead: the sidecar
        drops its open revisions (closed ones stay valid)."""
        iterator = getattr(base, "iterator", None)

        def run():
            frm, sent, changes, started = horizon, 0, [], time.monotonic()
            resync = False
            try:
                if iterator is None:
                    raise TypeError("%r has no transaction iterator" % (base,))
                it = iterator(p64(horizon + 1), p64(last))
                try:
                    for txn in it:
                        t = u64(txn.tid)
                        if t > last:
                            break
                        if getattr(txn, "status", " ") == "p":
                            raise ValueError("transaction %s was packed: its changes are incomplete"
                                             % tid_repr(txn.tid))
                        changes.extend((u64(r.oid), t) for r in txn)
                        sent += 1
                        if sent % CATCH_UP_CHUNK == 0:
                            self._tc_client.report(frm, t, changes)
                            frm, changes = t, []
                            logger.info("tidecache: %s catching up the sidecar: %d transactions, at %s",
                                        self._tc_client.database, sent, tid_repr(p64(t)))
                finally:
                    close = getattr(it, "close", None)
                    if close is not None:
                        close()
                self._tc_client.report(frm, last, changes)
                logger.info("tidecache: %s caught the sidecar up from %s to %s: %d transactions in %.2fs",
                            self._tc_client.database, tid_repr(p64(horizon)), tid_repr(p64(last)), sent,
                            time.monotonic() - started)
            except Exception as e:  # an iterator's or the sidecar's error: drop open revisions
                logger.info("tidecache: %s cannot catch the sidecar up from %s (%s): resyncing",
                            self._tc_client.database, tid_repr(p64(frm)), e)
                try:
                    self._tc_stats.resyncs += 1
                    self._tc_client.resync(last)
                except TideCacheError:
                    resync = True
            finally:
                self._tc_release(last, generation, True, resync)

        threading.Thread(target=run, name="tidecache-catch-up", daemon=True).start()

    # -- plain storage: everything else goes to the base --------------------

    def __getattr__(self, name):
        if name.startswith("_tc_") or name == "_storage":
            raise AttributeError(name)
        return getattr(self._storage, name)

    def __len__(self):
        return len(self._storage)

    def __repr__(self):
        return "<TideCacheStorage %s over %r>" % (self._tc_client.database, self._storage)

    def getName(self):
        """The base storage's name."""
        return self._storage.getName()

    def sortKey(self):
        """The base storage's sort key (two-phase commit ordering)."""
        return self._storage.sortKey()

    def lastTransaction(self):
        """The base storage's last committed tid."""
        return self._storage.lastTransaction()

    def isReadOnly(self):
        """Whether the base storage is read-only."""
        return self._storage.isReadOnly()

    def supportsUndo(self):
        """Whether the base storage supports undo."""
        s = self._storage
        return s.supportsUndo() if hasattr(s, "supportsUndo") else False

    # The storage-level write path (zodbconvert, tests, tools): commits made
    # through it are reported like a connection's.

    def _tc_modified(self, transaction):
        return self._tc_direct.setdefault(id(transaction), set())

    def tpc_begin(self, transaction, *args):
        """Begins a storage-level commit; its changes are collected for the
        report ``tpc_finish`` sends."""
        self._storage.tpc_begin(transaction, *args)
        self._tc_direct[id(transaction)] = set()

    def store(self, oid, serial, data, version, transaction):
        """``IStorage.store`` on the base; ``oid`` joins the report."""
        r = self._storage.store(oid, serial, data, version, transaction)
        self._tc_modified(transaction).add(oid)
        return r

    def restore(self, oid, serial, data, version, prev_txn, transaction):
        """``IStorageRestoreable.restore`` on the base; ``oid`` joins the report."""
        r = self._storage.restore(oid, serial, data, version, prev_txn, transaction)
        self._tc_modified(transaction).add(oid)
        return r

    def storeBlob(self, oid, oldserial, data, blobfilename, version, transaction):
        """``IBlobStorage.storeBlob`` on the base; ``oid`` joins the report."""
        r = self._storage.storeBlob(oid, oldserial, data, blobfilename, version, transaction)
        self._tc_modified(transaction).add(oid)
        return r

    def restoreBlob(self, oid, serial, data, blobfilename, prev_txn, transaction):
        """``IBlobStorageRestoreable.restoreBlob`` on the base; ``oid`` joins the report."""
        r = self._storage.restoreBlob(oid, serial, data, blobfilename, prev_txn, transaction)
        self._tc_modified(transaction).add(oid)
        return r

    def deleteObject(self, oid, oldserial, transaction):
        """``IExternalGC.deleteObject`` on the base; ``oid`` joins the report."""
        r = self._storage.deleteObject(oid, oldserial, transaction)
        self._tc_modified(transaction).add(oid)
        return r

    def undo(self, transaction_id, transaction):
        """``IStorageUndoable.undo`` on the base; the undone oids join the report."""
        r = self._storage.undo(transaction_id, transaction)
        if r:
            self._tc_modified(transaction).update(r[1])
        return r

    def tpc_vote(self, transaction):
        """``tpc_vote`` on the base; oids it resolved join the report."""
        r = self._storage.tpc_vote(transaction)
        if r:
            self._tc_modified(transaction).update(r)
        return r

    def tpc_finish(self, transaction, func=lambda tid: None):
        """Finishes the commit on the base; in its callback (commit order,
        under the base's commit lock) the changes are reported with the
        commit's tid and ZODB's connections are invalidated."""
        oids = self._tc_direct.pop(id(transaction), set())

        def finish(tid):
            self._invalidate_finish(tid, oids, None)
            func(tid)

        return self._storage.tpc_finish(transaction, finish)

    def tpc_abort(self, transaction):
        """Aborts on the base; nothing is reported."""
        self._tc_direct.pop(id(transaction), None)
        return self._storage.tpc_abort(transaction)

    def pack(self, pack_time, referencesf=None, *args, **kw):
        """Packs the base, then flushes this database in the sidecar: packed
        revisions must not be served any more."""
        if referencesf is None:
            from ZODB.serialize import referencesf
        r = self._storage.pack(pack_time, referencesf, *args, **kw)
        # Packed revisions must not be served from the cache any more.
        try:
            self._tc_client.flush()
        except TideCacheError as e:
            logger.warning("tidecache: could not flush the sidecar after a pack: %s", e)
        return r

    def copyTransactionsFrom(self, other):
        """Copies ``other``'s history in through ``restore`` (reported)."""
        from ZODB.BaseStorage import copy
        copy(other, self)

    # -- IMVCCStorage --------------------------------------------------------

    def release(self):
        """``IMVCCStorage.release`` of the root storage, which no connection
        uses (connections get ``new_instance()``): nothing to release."""

    def sync(self, force=True):
        """Lets the base storage catch up with other processes (ZEO)."""
        sync = getattr(self._storage, "sync", None)
        if sync is not None and force:
            sync()

    def poll_invalidations(self):
        """``IMVCCStorage.poll_invalidations`` of the root storage: the root
        holds no snapshot, so nothing it sees can be stale."""
        return []

    def new_instance(self):
        instance = TideCacheInstance(self)
        with self._lock:
            self._instances.add(instance)
        return instance

    def invalidate(self, transaction_id, oids):
        """Another process committed ``transaction_id`` (ZEO's
        ``invalidateTransaction``)."""
        self._tc_report(transaction_id, oids)
        MVCCAdapter.invalidate(self, transaction_id, oids)

    def _invalidate_finish(self, tid, oids, committing_instance):
        """This process committed ``tid`` (``tpc_finish``)."""
        self._tc_report(tid, oids)
        MVCCAdapter._invalidate_finish(self, tid, oids, committing_instance)

    def invalidateCache(self):
        """The base storage lost invalidations (ZEO reconnect): the next
        report is a resync."""
        with self._tc_lock:
            self._tc_resync = True
        MVCCAdapter.invalidateCache(self)

    def _tc_report(self, tid, oids):
        """Reports the commit ``tid`` of ``oids`` as ``(previous, tid]``."""
        with self._tc_lock:
            if self._tc_held is not None:
                self._tc_held.append((u64(tid), list(oids)))
            else:
                self._tc_report_locked(u64(tid), oids)

    def _tc_connection_generation(self):
        """ZEO's ``ClientStorage._connection_generation``: it moves when the
        client disconnects and again when it reconnects; ``None`` for
        storages without a server connection."""
        return getattr(self._storage, "_connection_generation", None)

    def _tc_report_locked(self, t, oids):
        if self._tc_reported is None:
            # Forked during the first attach: not known where the sidecar
            # stands; this storage attaches again from a poll.
            self._tc_reported, self._tc_joined = t, False
            return
        if t <= self._tc_reported:
            return
        frm, self._tc_reported = self._tc_reported, t
        if not self._tc_joined:
            # Not attached: nothing may be reported; the next attach covers
            # this commit (it attaches at the newest tid delivered).
            return
        self._tc_stats.invalidations += len(oids)
        generation = self._tc_connection_generation()
        if generation != self._tc_generation:
            # The connection to the server broke since the last report. ZEO's
            # reconnect delivers the missed transactions' oids as one
            # invalidation at the newest tid (ZEO/asyncio/client.py, verify)
            # *before* it calls invalidateCache: those tids are not exact.
            self._tc_generation = generation
            self._tc_resync = True
        # Both only queue (microseconds, no socket): the client's background
        # thread sends them in order, and itself sends a resync in place of
        # a report answered with a gap or lost to an unavailable sidecar.
        if self._tc_resync:
            self._tc_stats.resyncs += 1
            self._tc_client.resync(t)
            self._tc_resync = False
        else:
            self._tc_client.report(frm, t, [(u64(o), t) for o in oids])

    def close(self):
        """Closes the client (the sidecar releases this process's views) and
        the base storage."""
        try:
            if not self.closed:
                self._tc_client.close()
            MVCCAdapter.close(self)
        finally:
            # A closed storage has no locks a child could use: the fork
            # hook leaves it alone (it may stay alive for a while, in a
            # reference cycle until the garbage collector runs).
            _live.discard(self)

    # -- statistics ------------------------------------------------------------

    def cache_stats(self):
        """Counters of this storage: ``hits``, ``misses``, ``stores``,
        ``invalidations`` (changes reported), ``resyncs``, ``unavailable``
        (calls that found no sidecar, or a database not joined yet),
        ``proofs`` (proofs of the sidecar's horizon tried), ``flushes``
        (the database flushed at attach: a restored backup, a failed
        proof), ``joined`` (whether the database is joined in the sidecar),
        ``database`` (the key), and
        ``sidecar``: the sidecar's counters for this database, or ``None``
        when it is unavailable."""
        d = self._tc_stats.as_dict()
        resyncs, lost = self._tc_client.outbox_counts
        d["resyncs"] += resyncs
        d["unavailable"] += lost
        d["joined"] = self._tc_joined
        d["database"] = self._tc_client.database
        try:
            self._tc_client.wait_for_stores(1000)
            s = self._tc_client.stats()
            d["sidecar"] = s["databases"].get(self._tc_client.database)
        except TideCacheError:
            d["sidecar"] = None
        return d


class TideCacheInstance(MVCCAdapterInstance):
    """One connection's storage: ZODB's ``MVCCAdapterInstance`` whose loads
    are looked up in the sidecar at the connection's view."""

    _tc_view = None

    #: ``{oid: data}`` stored in the transaction being committed, written
    #: through at ``tpc_finish``; ``None`` outside a commit.
    _tc_written = None

    def __init__(self, base):
        MVCCAdapterInstance.__init__(self, base)
        self._tc_client = base._tc_client
        self._tc_stats = base._tc_stats
        self._tc_base = base
        self._tc_at = None

    # Write-through: a committing process stores the states it just
    # committed (ZEO's and RelStorage's caches do), so a read after a write
    # hits, in this process and in others.

    def tpc_begin(self, transaction):
        """Begins the commit; the states stored in it are collected."""
        MVCCAdapterInstance.tpc_begin(self, transaction)
        self._tc_written = {}

    def store(self, oid, serial, data, version, transaction):
        """Stores on the base; ``data`` is kept for the write-through."""
        MVCCAdapterInstance.store(self, oid, serial, data, version, transaction)
        if self._tc_written is not None and data is not None:
            self._tc_written[oid] = data

    def storeBlob(self, oid, serial, data, blobfilename, version, transaction):
        """Stores a blob on the base; its record is not written through."""
        MVCCAdapterInstance.storeBlob(self, oid, serial, data, blobfilename, version, transaction)
        if self._tc_written is not None:
            self._tc_written.pop(oid, None)

    def tpc_vote(self, transaction):
        """Votes on the base; oids it resolved conflicts of are not written
        through (what was committed is not what was stored)."""
        r = self._storage.tpc_vote(transaction)
        if r and self._tc_written:
            for oid in r:
                self._tc_written.pop(oid, None)
        return r

    def tpc_abort(self, transaction):
        """Aborts on the base; nothing is written through."""
        self._tc_written = None
        return self._storage.tpc_abort(transaction)

    def tpc_finish(self, transaction, func=lambda tid: None):
        """Finishes the commit; in its callback, after the report of the
        tid was queued (``_invalidate_finish``), each state stored is
        queued as the open revision ``(oid, tid)`` seen at ``tid``."""
        written, self._tc_written = self._tc_written, None

        def finish(tid):
            func(tid)
            if written:
                t = u64(tid)
                store_later = self._tc_client.store_later
                for oid, data in written.items():
                    if store_later(u64(oid), t, None, data, t):
                        self._tc_stats.stores += 1

        return MVCCAdapterInstance.tpc_finish(self, transaction, finish)

    def poll_invalidations(self):
        """ZODB's poll (new transaction): moves the view to the storage's
        ``lastTransaction`` and registers or advances it with the sidecar."""
        result = MVCCAdapterInstance.poll_invalidations(self)
        if not self._tc_base._tc_joined:
            self._tc_base._tc_rejoin()
        view = u64(self._start) - 1
        if self._tc_view is None:
            self._tc_view = self._tc_client.register_view(view)
        elif view != self._tc_at:
            self._tc_client.advance_view(self._tc_view, view)
        self._tc_at = view
        return result

    def afterCompletion(self):
        """The connection's transaction ended, or the connection went back
        to the pool (ZODB's ``Connection.close`` calls this, as RelStorage
        relies on): its view no longer holds the low-water mark back. The
        next ``poll_invalidations`` registers it again."""
        if self._tc_view is not None:
            self._tc_client.release_view(self._tc_view)
            self._tc_view = None

    def release(self):
        """The connection is discarded: release its view and the instance."""
        self.afterCompletion()
        MVCCAdapterInstance.release(self)

    close = release

    def load(self, oid):
        """``(state, serial)`` of ``oid`` at the connection's view: from the
        sidecar on a hit; else from ``loadBefore`` of the base storage, then
        queued as a store. Raises ``ReadConflictError`` as ZODB's
        ``MVCCAdapterInstance.load`` does when the oid has no revision there."""
        assert self._start is not None
        view = u64(self._start) - 1
        o = u64(oid)
        try:
            hit = self._tc_client.lookup(o, view)
        except TideCacheError:
            self._tc_stats.unavailable += 1
            hit = None
        if hit is not None:
            self._tc_stats.hits += 1
            return hit[1], p64(hit[0])
        self._tc_stats.misses += 1
        r = self._storage.loadBefore(oid, self._start)
        if r is None:
            # As MVCCAdapterInstance.load: deleted, or packed away.
            raise POSException.ReadConflictError(
                "load %s @%s: object deleted, likely by simultaneous pack" %
                (oid_repr(oid), tid_repr(p64(view))))
        data, serial, end = r
        if data is not None:
            s = u64(serial)
            if self._tc_client.store_later(o, s, u64(end) if end else None, data, view):
                self._tc_stats.stores += 1
        return data, serial
