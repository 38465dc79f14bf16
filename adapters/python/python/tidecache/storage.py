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
- a ZEO reconnect's quick verification (the oids changed while
  disconnected, at the server's tid) is sent as a collapsed report;
  ``invalidateCache`` when ZEO really lost invalidations (cache too old)
  makes the next report a ``resync`` (the client itself resyncs after a
  refused or lost report): the sidecar drops its open revisions rather
  than guess;
- a sidecar whose horizon is behind the storage at attach is told what
  changed meanwhile, bounded (``_tc_recover``: exact, collapsed or a
  resync);
- a commit writes its states through: after ``tpc_finish`` queued the
  report of its tid, each state the transaction stored (not blobs, not
  conflict-resolved ones) is queued as an open revision at that tid.

Reports, resyncs, views and stores only queue: the client's background
thread sends them, in order, so no application thread waits on the socket.

If the sidecar is absent, dead or slow, every lookup is a miss and the
application runs from its base storage (invariant 8 of docs/invariants.md).
"""

import atexit
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

#: Recovery (``TideCacheStorage._tc_recover``: the sidecar's horizon is
#: behind the storage at attach): seconds of exact reports from a local
#: storage's iterator; past them the rest of the backlog is summarised as
#: one collapsed report.
RECOVERY_EXACT_SECONDS = 0.1

#: Records per exact report while recovering from the iterator.
RECOVERY_CHUNK_RECORDS = 2000

#: Bound on a whole recovery from a local iterator, seconds: past it (a
#: backlog too large to read), the sidecar is resynced. Live reports are
#: held no longer than this.
RECOVERY_SECONDS = 1.0

#: Bound on ZEO's ``getInvalidations`` call (seconds to wait for the
#: connection; the call itself is one round trip).
RECOVERY_SERVER_TIMEOUT = 5.0

#: Bound on how long ``close`` waits for a recovery or an attach retry to
#: end (each is bounded by the bounds above and the client's timeouts).
CLOSE_JOIN_SECONDS = 30.0

#: Proofs tried in a row while the sidecar's horizon keeps moving (other
#: processes commit meanwhile); past them the attach is retried later.
PROOF_ATTEMPTS = 5

#: Seconds between attach retries (from ``poll_invalidations``) while this
#: storage is not joined to its database in the sidecar; after an attempt
#: that found the sidecar unavailable (which costs nothing: the client
#: fails at once while it waits to reconnect), ``RETRY_UNAVAILABLE``.
REJOIN_INTERVAL = 1.0
RETRY_UNAVAILABLE = 0.25

_STAT_KEYS = ("hits", "misses", "stores", "invalidations", "resyncs", "unavailable", "proofs", "flushes",
              "recoveries_exact", "recoveries_collapsed", "recoveries_resync", "reconnects_collapsed")

#: At most one WARNING per this many seconds per storage when its lookups
#: start falling back to the base storage (see ``_Stats.fell_back``).
FALLBACK_WARNING_INTERVAL = 60.0

#: ``cache_stats()`` asks the sidecar for its counters in the background
#: at most once per this many seconds (see ``_SidecarCounters``).
SIDECAR_STATS_INTERVAL = 1.0

#: Bound on the states one commit writes through (bytes): a larger
#: commit (a bulk import, which ZODB spools to disk through savepoints)
#: writes none through rather than hold its whole size in memory again.
WRITE_THROUGH_MAX_BYTES = 4 << 20

#: Live storages, for the fork hook below.
_live = weakref.WeakSet()


def _after_fork_in_child():
    """``os.register_at_fork(after_in_child=...)``: a child forked while
    another thread of the parent held a storage's locks (a ZEO or recovery
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
    """The key naming ``base``'s database in the sidecar (invariant 7): a
    readable string, the ``database`` label of the sidecar's metrics.

    - ZEO ``ClientStorage``: ``zeo:<addresses>:<storage name>``, each
      address a Unix socket's absolute path (``zeo:/run/zeo.sock:1``) or
      ``host:port`` (``zeo:db.example:8100:1``, an IPv6 host in brackets:
      ``zeo:[::1]:8100:1``), several joined with ``,`` in the order given
      (``zeo:db1:8100,db2:8100:1``); see :func:`zeo_database_key`;
    - FileStorage: ``file:<absolute path>`` (``file:/var/zodb/Data.fs``);
    - any other storage: ``<class>:<getName()>``, with the process id for
      in-memory storages (``MappingStorage``, ``DemoStorage``) that no
      other process can share.

    Pass ``database=`` to ``TideCacheStorage`` where two spellings name
    one database (two addresses of one ZEO server). A key that changes
    (an upgrade that spells it differently, a changed ``database``) names
    a new database in the sidecar: its cache starts cold, it never hits
    another key's revisions.
    """
    cls = type(base).__name__
    if hasattr(base, "_server_addr") or cls == "ClientStorage":
        return zeo_database_key(getattr(base, "_addr", None), getattr(base, "_storage", "1"))
    file_name = getattr(base, "_file_name", None)
    if file_name:
        return "file:" + os.path.abspath(file_name)
    name = base.getName() if hasattr(base, "getName") else repr(base)
    if cls in ("MappingStorage", "DemoStorage"):
        return "%s:%s:pid %d:%x" % (cls, name, os.getpid(), id(base))
    return "%s:%s" % (cls, name)


def _escaped(text, chars):
    """``text`` with ``%`` and each of ``chars`` written ``%XX``: the
    separators of a key never occur inside one of its parts."""
    for c in "%" + chars:
        text = text.replace(c, "%%%02X" % ord(c))
    return text


def zeo_database_key(addr, storage="1"):
    """The key of ZEO storage ``storage`` at ``addr`` (as ``ClientStorage``
    takes it or keeps it in ``_addr``: a Unix socket path, a ``(host,
    port)`` pair, a port alone, or a list of these):
    ``zeo:<address>[,<address>...]:<storage>``. A Unix socket's path is made
    absolute with its symlinks resolved (``os.path.realpath``: a lexical
    ``link/..`` would name another directory than the one the socket is
    in, and two sockets one key); ``%``, ``,`` and ``:`` inside a path or the storage name, and
    ``%`` and ``,`` inside a host, are written ``%25``, ``%2C``, ``%3A``, so
    the storage name is what follows the last ``:`` and two keys are equal
    only for the same addresses and storage."""
    if addr is None:
        addrs = []
    elif isinstance(addr, (str, int)) or (isinstance(addr, tuple) and len(addr) == 2
                                          and isinstance(addr[1], int)):
        addrs = [addr]
    else:
        addrs = list(addr)
    shown = []
    for a in addrs:
        if isinstance(a, int):
            a = ("127.0.0.1", a)
        if isinstance(a, str):
            shown.append(_escaped(os.path.realpath(a), ",:"))
        else:
            host, port = a[0], a[1]
            host = _escaped(str(host), ",")
            if ":" in host:
                host = "[%s]" % host
            shown.append("%s:%s" % (host, port))
    return "zeo:%s:%s" % (",".join(shown) or "?", _escaped(str(storage), ",:"))


class _Stats:
    """Counters of one storage (shared by its connections' instances);
    ``+=`` under the GIL is good enough for statistics. Also whether its
    lookups fall back to the base storage (:meth:`fell_back`,
    :meth:`served`), for the log."""

    #: Whether the last lookup fell back (read without a lock on the hot
    #: path: :meth:`served` is called only when it is true).
    falling_back = False

    def __init__(self):
        for k in _STAT_KEYS:
            setattr(self, k, 0)
        self._fallback_lock = threading.Lock()
        self._fallback_since = None
        self._fallback_lookups = 0
        self._fallback_warned = False
        self._last_warning = None
        self._suppressed = 0

    def as_dict(self):
        return {k: getattr(self, k) for k in _STAT_KEYS}

    def fell_back(self, client, why):
        """A lookup found no sidecar to ask (``Unavailable``: not connected,
        the database not joined, a timeout) and goes to the base storage.
        The first of a run of them logs a WARNING, at most one per
        ``FALLBACK_WARNING_INTERVAL`` seconds per storage: a run that
        starts sooner is counted, named in the next WARNING, and warned
        about itself once the interval has passed if it still lasts."""
        self.unavailable += 1
        with self._fallback_lock:
            now = time.monotonic()
            if not self.falling_back:
                self.falling_back = True
                self._fallback_since = now
                self._fallback_lookups = 0
                self._fallback_warned = False
            self._fallback_lookups += 1
            if self._fallback_warned:
                return
            if self._last_warning is not None and now - self._last_warning < FALLBACK_WARNING_INTERVAL:
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._last_warning = now
            self._fallback_warned = True
        logger.warning(
            "tidecache: %s: lookups fall back to the base storage (%s); the application goes on "
            "uncached until the sidecar serves it again%s",
            client.database, why,
            "" if not suppressed else
            " (%d more fallback%s since the previous warning, not logged)" % (
                suppressed, "" if suppressed == 1 else "s"))

    def warned_at_attach(self):
        """The first attach found no sidecar and said so at WARNING: that
        line starts the run of fallbacks (its lookups log no second
        WARNING; the INFO line still ends it)."""
        with self._fallback_lock:
            now = time.monotonic()
            if not self.falling_back:
                self.falling_back = True
                self._fallback_since = now
                self._fallback_lookups = 0
            self._fallback_warned = True
            self._last_warning = now

    def served(self, client):
        """A lookup was answered by the sidecar (hit or miss) while
        :attr:`falling_back`: one INFO line ends the run (if its WARNING
        was logged; a run not warned about is counted for the next
        WARNING instead)."""
        with self._fallback_lock:
            if not self.falling_back:
                return
            self.falling_back = False
            seconds = time.monotonic() - self._fallback_since
            lookups = self._fallback_lookups
            if not self._fallback_warned:
                self._suppressed += 1
                return
        logger.info("tidecache: %s: served by the sidecar again after %.1f s (%d lookup%s fell back "
                    "to the base storage meanwhile)", client.database, seconds, lookups,
                    "" if lookups == 1 else "s")


#: ``_SidecarCounters`` that started a refresh thread, joined at exit.
_refreshing = weakref.WeakSet()
_exiting = False


def _join_refreshes_at_exit():
    """``atexit``: waits for the refresh threads of ``cache_stats`` (each
    bounded by its client's timeout) and starts no more. A daemon thread
    still inside the native client when the interpreter finalizes would
    abort the process ("FATAL: exception not rethrown")."""
    global _exiting
    _exiting = True
    for counters in list(_refreshing):
        counters.join(CLOSE_JOIN_SECONDS)


atexit.register(_join_refreshes_at_exit)


class _SidecarCounters:
    """The sidecar's counters of one database as a background refresh last
    got them, for :meth:`_Joining.cache_stats`, which never asks the
    sidecar on the caller's thread. At most one refresh runs at a time, in
    a daemon thread of its own (``tidecache-stats``) that
    :meth:`join` waits for (the storage's ``close`` and, at exit,
    ``_join_refreshes_at_exit``); a refresh starts at most once per
    ``SIDECAR_STATS_INTERVAL`` seconds."""

    def __init__(self):
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._thread = None
        self._asked_at = None
        #: The database's counters in the last answer (``None``: no
        #: answer yet, or the sidecar did not know the database).
        self.answer = None
        #: ``time.monotonic()`` of the last answer, ``None`` before one.
        self.answered_at = None

    def refresh_later(self, client, closing):
        """Starts a refresh unless one runs, the last started less than
        ``SIDECAR_STATS_INTERVAL`` seconds ago, or ``closing`` is set.
        Never waits (only for this object's lock, held for a few
        statements)."""
        if self._pid != os.getpid():
            # A forked child: the parent's thread is not here and its lock
            # may have been copied held.
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._thread = None
        if not self._lock.acquire(blocking=False):
            return
        try:
            if closing.is_set() or _exiting:
                return
            if self._thread is not None and self._thread.is_alive():
                return
            now = time.monotonic()
            if self._asked_at is not None and now - self._asked_at < SIDECAR_STATS_INTERVAL:
                return
            self._asked_at = now
            thread = threading.Thread(target=self._refresh, args=(client,), name="tidecache-stats",
                                      daemon=True)
            self._thread = thread
            _refreshing.add(self)
            thread.start()
        finally:
            self._lock.release()

    def _refresh(self, client):
        try:
            s = client.stats()
        except TideCacheError as e:
            logger.debug("tidecache: %s: no counters from the sidecar: %s", client.database, e)
            return
        except Exception:
            logger.exception("tidecache: %s: asking the sidecar for its counters failed",
                             client.database)
            return
        self.remember(s, client.database)

    def remember(self, stats, database):
        """Keeps ``database``'s part of ``stats`` (a ``Stats`` answer)."""
        self.answer = stats["databases"].get(database)
        self.answered_at = time.monotonic()

    def join(self, timeout):
        """Waits up to ``timeout`` seconds for a refresh in flight (call
        after setting the storage's ``_tc_closing``: none starts then)."""
        if self._pid != os.getpid():
            return
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


class _Joining:
    """Joining a database in the sidecar (invariant 7): the attach with its
    proof, and the storage's counters, shared by :class:`TideCacheStorage`
    and :class:`tidecache.relstorage.TideCacheRelStorage`. Needs ``_tc_client``,
    ``_tc_socket``, ``_tc_stats``, ``_tc_unavailable`` and
    ``_tc_behind_since``."""

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
        committed to since, another file at the same path). A proof that
        can neither prove nor contradict (``None``: a history-free
        RelStorage whose horizon revisions were all changed since) is tried
        again with a fresh view, then left not joined (retried from a later
        poll), never flushed."""
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
            # An empty storage (no transaction yet, or zapped) is no lagging
            # copy of anything the sidecar holds: flushed at once.
            lagging = last > 0
            while state == "behind" and wait and lagging and time.monotonic() < deadline:
                time.sleep(0.02)
                sync = getattr(base, "sync", None)
                if sync is not None:
                    sync()
                last = max(last, u64(base.lastTransaction()))
                state = client.attach(last)
            if state == "behind" and not wait and lagging:
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
                elif proved is None:
                    # Nothing contradicts the horizon, nothing proves it
                    # (its revisions were all changed since): a later
                    # horizon may prove; never a flush for that.
                    logger.info("tidecache: %s cannot check the sidecar's horizon %s yet (%s)",
                                client.database, tid_repr(p64(horizon)), how)
                    sync = getattr(base, "sync", None)
                    if sync is not None:
                        sync()
                    last = max(last, u64(base.lastTransaction()))
                    state = client.attach(last)
                    if state == "prove" and client.proof is not None and client.proof[0] == horizon:
                        break  # the same horizon: retried later, from a poll
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
            if wait:
                self._tc_stats.warned_at_attach()
            self._tc_unavailable = True
            return last, False

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

    #: MiB of shared-state templates asked for by the ZConfig section's
    #: ``shared-state on`` (``None``: not asked; see tidecache.shared).
    _tc_shared_state_mb = None

    def _tc_share(self, states):
        """Feeds ``states`` (the process's ``SharedStates`` of this
        database, see :mod:`tidecache.shared`) every report this storage
        makes from now on, and starts its log at the newest tid reported:
        under ``_tc_lock``, which every report is made under, so the chain
        is contiguous. Before the first attach nothing was reported: the
        log starts at the first report."""
        with self._tc_lock:
            self._tc_client.share_states(states)
            if self._tc_reported is not None:
                states.start_log(self._tc_reported)

    def cache_stats(self, wait=False):
        """Counters of this storage (both adapters), returned at once: the
        sidecar is never asked on the caller's thread (unless ``wait``).

        This process's own: ``hits``, ``misses``, ``stores``,
        ``invalidations`` (changes reported), ``resyncs``, ``unavailable``
        (lookups that found no sidecar to ask, or a database not joined
        yet, and went to the base storage; and queued messages dropped
        while the sidecar was away), ``proofs`` (proofs of the sidecar's
        horizon tried), ``flushes`` (the database flushed at attach: a
        restored backup, a failed proof), ``recoveries_exact``,
        ``recoveries_collapsed``, ``recoveries_resync`` (how the sidecar's
        horizon, found behind the storage at attach, was brought up: see
        ``_tc_recover``), ``reconnects_collapsed`` (ZEO reconnects
        reported as a collapsed report rather than a resync; the
        ``recoveries_*`` and this are 0 over RelStorage), ``joined``
        (whether the database is joined in the sidecar), ``falling_back``
        (whether the last lookup went to the base storage for want of a
        sidecar), ``database`` (the key).

        The sidecar's: ``sidecar``, its counters of this database (a dict:
        ``entries``, ``bytes``, ``hits``, ``misses``, ``stores``, ... as
        in ``tidecached stats``) from the last answer a background refresh
        got, ``None`` before any answer; ``sidecar_age_s``, that answer's
        age in seconds (``None`` without one): a sidecar that stopped
        answering shows as a growing age. Each call starts a refresh in a
        daemon thread unless one runs or one started less than
        ``SIDECAR_STATS_INTERVAL`` (1 s) ago; ``close`` waits for it.

        With ``wait=True`` (scripts and tests, never a request path) the
        sidecar is asked on this thread, after this process's queued
        stores were sent (up to 1 s, then the client's timeout), and
        ``sidecar`` is ``None`` if it does not answer."""
        d = self._tc_stats.as_dict()
        resyncs, lost = self._tc_client.outbox_counts
        d["resyncs"] += resyncs
        d["unavailable"] += lost
        d["joined"] = self._tc_joined and self._tc_client.joined
        d["falling_back"] = self._tc_stats.falling_back
        d["database"] = self._tc_client.database
        counters = self.__dict__.get("_tc_sidecar_counters")
        if counters is None:
            counters = self.__dict__.setdefault("_tc_sidecar_counters", _SidecarCounters())
        if wait:
            try:
                self._tc_client.wait_for_stores(1000)
                counters.remember(self._tc_client.stats(), self._tc_client.database)
            except TideCacheError:
                d["sidecar"], d["sidecar_age_s"] = None, None
                return d
        else:
            counters.refresh_later(self._tc_client, self._tc_closing)
        at = counters.answered_at
        d["sidecar"] = counters.answer if at is not None else None
        d["sidecar_age_s"] = None if at is None else max(0.0, time.monotonic() - at)
        return d

    def _tc_join_stats_refresh(self, timeout=CLOSE_JOIN_SECONDS):
        """Waits for a background refresh of :meth:`cache_stats` (bounded
        by the client's timeout); call with ``_tc_closing`` set."""
        counters = self.__dict__.get("_tc_sidecar_counters")
        if counters is not None:
            counters.join(timeout)



@zope.interface.implementer(IMVCCStorage)
class TideCacheStorage(_Joining, MVCCAdapter):
    """Wraps ``base`` (any ZODB storage) and caches its revisions in the
    ``tidecached`` sidecar listening on ``socket``.

    :param base: the storage that holds the data: FileStorage,
        MappingStorage, ZEO ClientStorage, ...; given a RelStorage, the
        result is a :class:`tidecache.relstorage.TideCacheRelStorage`.
    :param socket: path of the sidecar's Unix socket.
    :param database: the database's key in the sidecar; default
        :func:`database_key` of ``base``.
    :param timeout_ms: bound on each call to the sidecar, milliseconds;
        past it the call is a miss.
    """

    def __new__(cls, base, *args, **kw):
        """A RelStorage (an ``IMVCCStorage``) is wrapped by
        :class:`tidecache.relstorage.TideCacheRelStorage` instead (same
        arguments)."""
        if cls is TideCacheStorage and IMVCCStorage.providedBy(base):
            from tidecache.relstorage import TideCacheRelStorage

            return TideCacheRelStorage(base, *args, **kw)
        return super().__new__(cls)

    def __init__(self, base, socket, database=None, timeout_ms=50):
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
        # Write-through stores of held commits: (oid, tid, state).
        self._tc_held_stores = []
        self._tc_direct = {}
        # The thread attaching again or recovering (at most one: it runs
        # with _tc_join_lock held, or was started under it); close() sets
        # _tc_closing (a recovery then resyncs at once) and joins it.
        self._tc_worker = None
        self._tc_closing = threading.Event()
        self._tc_warned_resync = False
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
            self._tc_join(wait=True, background=True)

    def _tc_join(self, wait, background):
        """Attaches to the sidecar (with a proof, :meth:`_tc_attach`) at the
        newest tid this storage has: its ``lastTransaction``, or a newer tid
        already delivered. Live reports are held meanwhile; once attached,
        a sidecar whose horizon is behind is told what changed since
        (:meth:`_tc_recover`, bounded), then the held reports are sent.
        With ``background`` the recovery runs in a thread of its own
        (``_tc_worker``, joined by :meth:`close`), else in the caller's.
        Called with ``_tc_join_lock`` held, and with ``_tc_held`` a list."""
        base = self._storage
        with self._tc_lock:
            generation = self._tc_connection_generation()
            # Everything up to the tid attached at is covered by the attach
            # (and the recovery): the flag of the time before is obsolete.
            self._tc_resync = False
            known = self._tc_reported or 0
        last = max(u64(base.lastTransaction()), known)
        last, joined = self._tc_attach(base, last, wait)
        horizon = self._tc_client.horizon
        if joined:
            # Joined in the sidecar; reports stay held until the recovery
            # (if any) is done. A child forked meanwhile (whose recovery
            # thread is gone) is joined and resyncs (``_tc_after_fork``).
            with self._tc_lock:
                self._tc_joined = True
                self._tc_reported = max(last, self._tc_reported or 0)
                self._tc_generation = generation
        if joined and 0 < horizon < last:
            if background:
                worker = threading.Thread(target=self._tc_recover, args=(base, horizon, last, generation),
                                          name="tidecache-recovery", daemon=True)
                self._tc_worker = worker
                worker.start()
            else:
                self._tc_recover(base, horizon, last, generation)
        else:
            self._tc_release(last, generation, joined)

    def _tc_release(self, last, generation, joined, resync=False):
        """Ends an attach (and its recovery) at ``last``: reports held
        meanwhile that are newer are sent."""
        with self._tc_lock:
            self._tc_joined = joined
            self._tc_reported = max(last, self._tc_reported or 0)
            self._tc_generation = generation
            self._tc_resync = self._tc_resync or resync
            held, self._tc_held = self._tc_held, None
            for t, oids in held or ():
                self._tc_report_locked(t, oids)
            stores, self._tc_held_stores = self._tc_held_stores, []
            if joined:
                # Write-through held with the reports of their commits:
                # queued after them, so they are not past the horizon.
                for oid, t, data in stores:
                    if self._tc_client.store_later(oid, t, None, data, t):
                        self._tc_stats.stores += 1

    def _tc_hold_or_store(self, written, t):
        """Queues the write-through of the commit ``t`` (``written``:
        oid -> state), or holds it beside the commit's report while an
        attach or a recovery holds reports: sent before its report, the
        store would be past the sidecar's horizon and refused."""
        # Called in the commit's second phase: nothing here may fail it.
        try:
            with self._tc_lock:
                if self._tc_held is not None:
                    self._tc_held_stores.extend((u64(oid), t, data) for oid, data in written.items())
                    return
            store_later = self._tc_client.store_later
            for oid, data in written.items():
                if store_later(u64(oid), t, None, bytes(data), t):
                    self._tc_stats.stores += 1
        except Exception:
            logger.exception("tidecache: %s: the write-through of %s failed (the commit stands; "
                             "its states are loaded again on the next read)",
                             self._tc_client.database, tid_repr(p64(t)))

    def _tc_rejoin(self):
        """Attaches again if the first attach never joined (the sidecar was
        unavailable, or its horizon kept moving during the proof): at most
        once per ``REJOIN_INTERVAL``, from a connection's poll, never
        waiting for another thread's attempt. The attach (socket calls, a
        proof that loads from the base storage, a recovery) runs in a
        short-lived daemon thread, one at a time (it holds
        ``_tc_join_lock``), which :meth:`close` joins: the connection's
        poll returns at once and runs from the base storage meanwhile."""
        now = time.monotonic()
        if now < self._tc_next_join or self._tc_closing.is_set():
            return
        if not self._tc_join_lock.acquire(blocking=False):
            return
        started = False
        try:
            self._tc_next_join = now + REJOIN_INTERVAL
            with self._tc_lock:
                if self._tc_joined or self._tc_held is not None:
                    return
                self._tc_held = []
            worker = threading.Thread(target=self._tc_rejoin_run, name="tidecache-rejoin", daemon=True)
            self._tc_worker = worker
            worker.start()
            started = True
        except Exception:  # never let a retry break a connection's poll
            logger.exception("tidecache: attaching %s again failed", self._tc_client.database)
            self._tc_release_held_unjoined()
        finally:
            if not started:
                self._tc_join_lock.release()

    def _tc_rejoin_run(self):
        """The rejoin thread: attaches (and recovers) in this thread, then
        releases ``_tc_join_lock``, which :meth:`_tc_rejoin` took for it."""
        try:
            if self._tc_closing.is_set():
                self._tc_release_held_unjoined()
                return
            self._tc_join(wait=False, background=False)
            if self._tc_unavailable:
                self._tc_next_join = time.monotonic() + RETRY_UNAVAILABLE
        except Exception:
            logger.exception("tidecache: attaching %s again failed", self._tc_client.database)
            self._tc_release_held_unjoined()
        finally:
            self._tc_join_lock.release()

    def _tc_forgotten(self):
        """The client was told ``Stale``: another process (or this one's
        ``pack``) flushed the database in the sidecar since it joined. It is
        joined again, with a proof, from this poll (:meth:`_tc_rejoin`);
        meanwhile loads go to the base storage."""
        with self._tc_lock:
            if not self._tc_joined:
                return
            self._tc_joined = False
            self._tc_next_join = 0.0
        logger.info("tidecache: %s was flushed in the sidecar by another process (or a pack): "
                    "joining it again", self._tc_client.database)

    def _tc_release_held_unjoined(self):
        """An attach that failed: the reports it held are passed on (not
        joined, they only move ``_tc_reported``)."""
        with self._tc_lock:
            if self._tc_held is not None and not self._tc_joined:
                held, self._tc_held = self._tc_held, None
                for t, oids in held:
                    self._tc_report_locked(t, oids)
                self._tc_held_stores = []

    def _tc_after_fork(self):
        """In a forked child (gunicorn ``--preload``, uwsgi): new locks in
        place of the parent's, which a thread of the parent's may have held
        (the native client does the same for its own). If a report was in
        flight then (the lock was held) or a recovery was running (its
        thread is not here, its held reports would wait forever), whether the
        sidecar got those transactions is unknown: the next report is a
        resync."""
        in_flight = self._tc_lock.locked() or self._tc_held is not None
        self._tc_lock = threading.Lock()
        self._tc_join_lock = threading.Lock()
        # The parent's recovery or rejoin thread is not in this process.
        self._tc_worker = None
        closing, self._tc_closing = self._tc_closing, threading.Event()
        if closing.is_set():
            self._tc_closing.set()
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
            self._tc_held_stores = []
            self._tc_resync = True

    def _tc_recover(self, base, horizon, last, generation):
        """The sidecar's horizon is behind this storage (it restarted and
        re-attached its arena file, or commits were made while no tidecache
        client was connected): tells it what changed in ``(horizon, last]``
        so that its open revisions answer again, each unchanged one kept
        warm, within a bounded time; live reports are held meanwhile and
        sent after (:meth:`_tc_release`). Runs in its own thread (or the
        rejoin's), which :meth:`close` joins; ``close`` cuts it short.

        The choice, in order:

        - ``exact``: a local storage (not a ZEO ``ClientStorage``, whose
          iterator costs a round trip per transaction and per record) is
          iterated for up to ``RECOVERY_EXACT_SECONDS``, its changes
          reported with their tids, ``RECOVERY_CHUNK_RECORDS`` records a
          report;
        - ``collapsed``: past that bound the rest of the local iterator is
          summarised as one collapsed report (each oid with its newest tid,
          up to ``RECOVERY_SECONDS`` in all); for ZEO, the server's own
          record of recent invalidations (``getInvalidations``: its
          invalidation queue, or with ``invalidation-age`` its storage's
          iterator, server-side), one round trip whatever the backlog;
        - ``resync`` when nothing can say what changed (no iterator, a
          packed range, ZEO answering ``None``, the bounds exceeded, the
          storage closing, an error): the sidecar drops its open
          revisions (closed ones stay valid). Logged at WARNING (once per
          storage) with what the operator can do.

        The choice is logged at INFO (which, backlog, time taken) and
        counted (``recoveries_exact``, ``recoveries_collapsed``,
        ``recoveries_resync`` in :meth:`cache_stats`)."""
        started = time.monotonic()
        reached, resync = last, False
        database = self._tc_client.database
        try:
            try:
                if self._tc_is_zeo(base):
                    kind, detail, reached = self._tc_recover_from_server(base, horizon, last)
                else:
                    kind, detail = self._tc_recover_from_iterator(base, horizon, last, started)
            except Exception as e:  # an iterator's, the server's or the sidecar's error
                kind, detail = None, "%s: %s" % (type(e).__name__, e)
            if kind is None:
                self._tc_stats.recoveries_resync += 1
                self._tc_warn_resync(horizon, last, detail)
                try:
                    self._tc_stats.resyncs += 1
                    self._tc_client.resync(last)
                except TideCacheError:
                    resync = True
                kind = "resync"
            else:
                setattr(self._tc_stats, "recoveries_" + kind, getattr(self._tc_stats, "recoveries_" + kind) + 1)
            logger.info("tidecache: %s recovered the sidecar's horizon %s -> %s by %s (%s) in %.3fs",
                        database, tid_repr(p64(horizon)), tid_repr(p64(reached)), kind, detail,
                        time.monotonic() - started)
        finally:
            self._tc_release(reached, generation, True, resync)

    def _tc_warn_resync(self, horizon, last, why):
        """The WARNING of a recovery that resyncs, once per storage."""
        if self._tc_warned_resync:
            logger.info("tidecache: %s resyncs the sidecar (horizon %s, storage at %s): %s",
                        self._tc_client.database, tid_repr(p64(horizon)), tid_repr(p64(last)), why)
            return
        self._tc_warned_resync = True
        if self._tc_is_zeo(self._storage):
            advice = ("set invalidation-age on the ZEO server (e.g. 86400 seconds, <zeo> section) so "
                      "that it can say which objects changed over a longer gap")
        else:
            advice = ("the storage cannot say what changed quickly enough; attach a tidecache client "
                      "before committing (admin scripts through TideCacheStorage) to avoid it")
        logger.warning("tidecache: %s: the sidecar's horizon %s is behind the storage (%s) and %s: "
                       "resyncing, its cached current revisions are dropped (misses until they are "
                       "loaded again). To keep them: %s.",
                       self._tc_client.database, tid_repr(p64(horizon)), tid_repr(p64(last)), why, advice)

    @staticmethod
    def _tc_is_zeo(base):
        """Whether ``base`` is a ZEO ``ClientStorage`` (its iterator is a
        round trip per transaction; its server keeps invalidations)."""
        return hasattr(base, "_connection_generation") and hasattr(base, "_call")

    def _tc_recover_from_iterator(self, base, horizon, last, started):
        """Exact reports from ``base``'s iterator, then one collapsed report
        past ``RECOVERY_EXACT_SECONDS``; returns ``(kind, detail)``, kind
        ``None`` for a resync."""
        iterator = getattr(base, "iterator", None)
        if iterator is None:
            return None, "%s has no transaction iterator" % type(base).__name__
        try:
            it = iterator(p64(horizon + 1), p64(last))
        except NotImplementedError:
            return None, "%s cannot iterate" % type(base).__name__
        exact_until = started + RECOVERY_EXACT_SECONDS
        give_up = started + RECOVERY_SECONDS
        frm, previous, changes, newest = horizon, horizon, [], None
        transactions = exact_transactions = 0
        try:
            for txn in it:
                t = u64(txn.tid)
                if t > last:
                    break
                if getattr(txn, "status", " ") == "p":
                    return None, ("transaction %s was packed: the changes of (%s, %s] are incomplete"
                                  % (tid_repr(txn.tid), tid_repr(p64(horizon)), tid_repr(p64(last))))
                now = time.monotonic()
                if self._tc_closing.is_set():
                    return None, "the storage is closing (%d transactions read)" % transactions
                if now > give_up:
                    return None, ("more than %.1fs to read the backlog (%d transactions read)"
                                  % (RECOVERY_SECONDS, transactions))
                if newest is None and now > exact_until:
                    # Past the exact bound: what was read goes out exact,
                    # the rest as one collapsed report.
                    if changes:
                        self._tc_client.report(frm, previous, changes)
                        frm, changes = previous, []
                    newest = {}
                if newest is None:
                    changes.extend((u64(r.oid), t) for r in txn)
                    exact_transactions += 1
                    if len(changes) >= RECOVERY_CHUNK_RECORDS:
                        self._tc_client.report(frm, t, changes)
                        frm, changes = t, []
                else:
                    for r in txn:
                        newest[u64(r.oid)] = t
                previous = t
                transactions += 1
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        if newest is None:
            self._tc_client.report(frm, last, changes)
            return "exact", "%d transactions" % transactions
        self._tc_client.report_collapsed(frm, last, sorted(newest.items()))
        return "collapsed", ("%d transactions, %d exact, %d oids changed in the rest"
                             % (transactions, exact_transactions, len(newest)))

    def _tc_recover_from_server(self, base, horizon, last):
        """One collapsed report from ZEO's ``getInvalidations(horizon)``;
        returns ``(kind, detail, reached)``, kind ``None`` for a resync.

        The server answers ``(latest_tid, oids)``: every oid changed in
        ``(horizon, latest_tid]`` (from its invalidation queue, or by
        iterating its storage when ``invalidation-age`` covers
        ``horizon``), or ``None`` when it cannot. ``latest_tid`` may be
        past this client's ``lastTransaction`` (commits whose invalidations
        are on their way): the report covers them, ``_tc_reported`` moves
        to ``latest_tid`` and the live reports at or below it are skipped
        (their oids are in the report), so reports stay contiguous and in
        order."""
        if self._tc_closing.is_set():
            return None, "the storage is closing", last
        r = base._call("getInvalidations", p64(horizon), timeout=RECOVERY_SERVER_TIMEOUT)
        if r is None:
            return None, ("the ZEO server keeps no invalidations back to %s (beyond its "
                          "invalidation-queue-size, no invalidation-age)" % tid_repr(p64(horizon))), last
        latest, oids = r
        latest = u64(latest)
        if latest < last:
            return None, ("the ZEO server's invalidations end at %s, before this client's %s"
                          % (tid_repr(p64(latest)), tid_repr(p64(last)))), last
        self._tc_client.report_collapsed(horizon, latest, [(u64(o), latest) for o in oids])
        return "collapsed", "the ZEO server's invalidations: %d oids" % len(oids), latest

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
        self._tc_report(transaction_id, oids, self._tc_server_previous())
        MVCCAdapter.invalidate(self, transaction_id, oids)

    def _invalidate_finish(self, tid, oids, committing_instance):
        """This process committed ``tid`` (``tpc_finish``)."""
        self._tc_report(tid, oids)
        MVCCAdapter._invalidate_finish(self, tid, oids, committing_instance)

    def invalidateCache(self):
        """The base storage lost invalidations: the next report is a
        resync, unless nothing was lost since the last report.

        ZEO calls it at every reconnect (``ClientStorage.notify_connected``,
        after its verification, with ``lastTransaction`` already the
        server's tid), and during the verification when its cache is too
        old for the server's invalidations ("cache too old": then
        ``lastTransaction`` moves to the server's tid before the reconnect's
        call). If ``lastTransaction`` is at or below the newest tid
        reported, every transaction up to it was reported (the quick
        verification's collapsed report, or nothing was missed): nothing
        to drop. Otherwise (cache too old, an empty ZEO cache that ZEO does
        not verify at all) transactions were missed and the next report
        is a resync. Other storages: always a resync."""
        last = self._tc_server_previous()  # before _tc_lock: ZEO's cache lock comes first
        with self._tc_lock:
            if last is None or self._tc_reported is None or last > self._tc_reported:
                self._tc_resync = True
        MVCCAdapter.invalidateCache(self)

    def _tc_server_previous(self):
        """For a ZEO ``ClientStorage``: its ``lastTransaction`` (its
        cache's tid) as an integer; ``None`` for other storages. Read in
        ZEO's IO thread as it delivers an invalidation, it is the tid the
        invalidation follows (ZEO moves it after the delivery)."""
        if not self._tc_is_zeo(self._storage):
            return None
        try:
            return u64(self._storage.lastTransaction() or b"\0" * 8)
        except Exception:
            return None

    def _tc_report(self, tid, oids, previous=None):
        """Reports the commit ``tid`` of ``oids`` as ``(previous report,
        tid]``; ``previous`` is the base's tid before it (ZEO only; see
        :meth:`_tc_report_locked`)."""
        with self._tc_lock:
            if self._tc_held is not None:
                self._tc_held.append((u64(tid), list(oids)))
            else:
                self._tc_report_locked(u64(tid), oids, previous)

    def _tc_connection_generation(self):
        """ZEO's ``ClientStorage._connection_generation``: it moves when the
        client disconnects and again when it reconnects; ``None`` for
        storages without a server connection."""
        return getattr(self._storage, "_connection_generation", None)

    def _tc_report_locked(self, t, oids, previous=None):
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
        collapsed = False
        if generation != self._tc_generation:
            # The connection to the server broke since the last report.
            # ZEO's reconnect (ZEO/asyncio/client.py, verify: "quick
            # verification") asks its server for the oids changed since its
            # cache's tid and delivers them as ONE invalidation at the
            # server's tid: not exact tids, but every oid changed in
            # (cache tid, server tid] -- a collapsed report. Its ``from``
            # is our last reported tid ``frm``, which is right when the
            # ZEO cache's tid (``previous``: ZEO calls us before it moves
            # its cache's tid to ``t``) is at or below it: (frm, t] lies
            # within (cache tid, t], so every oid changed in (frm, t] is
            # listed. The cache tid is never behind the last tid this
            # storage heard of in practice (both move with every delivered
            # invalidation and commit), and when it is ahead (an empty ZEO
            # cache is not verified at all, a "cache too old" one is
            # cleared and set to the server's tid, and later invalidations
            # follow it), what lies between is unknown: a resync. A report
            # lost since (``_tc_resync``) resyncs too, whatever ZEO says.
            self._tc_generation = generation
            if not self._tc_resync and previous is not None and previous <= frm:
                collapsed = True
            else:
                self._tc_resync = True
        # These only queue (microseconds, no socket): the client's
        # background thread sends them in order, and itself sends a resync
        # in place of a report answered with a gap or lost to an
        # unavailable sidecar.
        if collapsed:
            self._tc_client.report_collapsed(frm, t, [(u64(o), t) for o in oids])
            self._tc_stats.reconnects_collapsed += 1
            return
        if self._tc_resync:
            self._tc_stats.resyncs += 1
            self._tc_client.resync(t)
            self._tc_resync = False
        else:
            self._tc_client.report(frm, t, [(u64(o), t) for o in oids])

    def close(self):
        """Ends a recovery or an attach retry still running (it resyncs at
        once rather than read on, and is joined: no thread of this storage
        nor call of it is left running), then closes the client (the
        sidecar releases this process's views) and the base storage."""
        try:
            self._tc_closing.set()
            self._tc_join_worker()
            self._tc_join_stats_refresh()
            if not self.closed:
                self._tc_client.close()
            MVCCAdapter.close(self)
        finally:
            # A closed storage has no locks a child could use: the fork
            # hook leaves it alone (it may stay alive for a while, in a
            # reference cycle until the garbage collector runs).
            _live.discard(self)

    def _tc_join_worker(self):
        """Waits for the recovery or rejoin thread (bounded: each ends
        within its bounds once ``_tc_closing`` is set). A rejoin thread
        holds ``_tc_join_lock`` to its end, and one starting now sees
        ``_tc_closing``: taking the lock waits for it."""
        deadline = time.monotonic() + CLOSE_JOIN_SECONDS
        worker = self._tc_worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(max(0.0, deadline - time.monotonic()))
        if self._tc_join_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self._tc_join_lock.release()
        worker = self._tc_worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                logger.warning("tidecache: %s closed while its %s thread still runs (more than %.0fs: "
                               "the sidecar or the storage does not answer)",
                               self._tc_client.database, worker.name, CLOSE_JOIN_SECONDS)

    # -- statistics ------------------------------------------------------------

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
        self._tc_written_bytes = 0

    def store(self, oid, serial, data, version, transaction):
        """Stores on the base; ``data`` is kept for the write-through (up to
        ``WRITE_THROUGH_MAX_BYTES`` per commit)."""
        MVCCAdapterInstance.store(self, oid, serial, data, version, transaction)
        if self._tc_written is not None and data is not None:
            self._tc_written[oid] = data
            self._tc_written_bytes += len(data)
            if self._tc_written_bytes > WRITE_THROUGH_MAX_BYTES:
                self._tc_written = None

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
                self._tc_base._tc_hold_or_store(written, u64(tid))

        return MVCCAdapterInstance.tpc_finish(self, transaction, finish)

    def poll_invalidations(self):
        """ZODB's poll (new transaction): moves the view to the storage's
        ``lastTransaction`` and registers or advances it with the sidecar."""
        result = MVCCAdapterInstance.poll_invalidations(self)
        base = self._tc_base
        if base._tc_joined and not self._tc_client.joined:
            base._tc_forgotten()
        if not base._tc_joined:
            base._tc_rejoin()
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
        data, serial, _, _ = self._tc_load_revision(oid)
        return data, serial

    #: Shared state reads the view from ``_start`` itself (see
    #: ``_tc_shared_view``).
    _tc_view_is_start = True

    def _tc_shared_view(self):
        """The view (a tid as an int) ``load`` reads at now, ``None`` before
        the connection's first poll: shared state looks templates up at it
        (natively, as ``_start - 1``: keep the two the same)."""
        start = self._start
        return None if start is None else u64(start) - 1

    def _tc_load_revision(self, oid):
        """``load`` with what shared state needs to keep the revision:
        ``(state, serial, end, view)``: ``end`` the tid that ended it (an
        int; ``None`` when it is current at ``view`` or not known), ``view``
        the tid it was read at. Raises as ``load``."""
        assert self._start is not None
        view = u64(self._start) - 1
        o = u64(oid)
        stats = self._tc_stats
        try:
            hit = self._tc_client.lookup(o, view)
        except TideCacheError as e:
            stats.fell_back(self._tc_client, e)
            hit = None
        else:
            if stats.falling_back:
                stats.served(self._tc_client)
        if hit is not None:
            stats.hits += 1
            return hit[1], p64(hit[0]), None, view
        stats.misses += 1
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
        return data, serial, u64(end) if end else None, view
