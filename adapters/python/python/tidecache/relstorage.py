"""``TideCacheRelStorage``: tidecache as the shared host cache of a
RelStorage (PostgreSQL, MySQL, SQLite).

RelStorage is itself an ``IMVCCStorage``: each ZODB connection gets an
instance (``new_instance()``) with its own load connection, whose snapshot
is the connection's view, and its own ``poll_invalidations``. So tidecache
wraps it as ``zc.zlibstorage`` does, a root wrapper and one wrapper per
instance, and hooks three places:

- **Views.** An instance's view is the tid its last poll saw
  (``instance._cache.highest_visible_tid``; RelStorage's public
  ``lastTransaction()`` can be past it after the instance's own commit,
  before the instance polls again), or its own last commit if newer once
  it polled after it (a history-free commit that only deleted objects
  leaves no row for the poll to see).
  RelStorage's load connection polls again by itself on its first use
  after a rollback (``afterCompletion``, a commit), so the view can move
  without ``poll_invalidations``: every load first touches the load
  connection's cursor (what RelStorage's own ``load`` does, which polls if
  needed) and then reads the view, and advances the registered view if it
  moved.
- **Reports.** Every poll a process makes reaches the database through its
  adapter's poller (``adapter.poller.poll_invalidations(conn, cursor,
  since)``, from RelStorage's process-wide ``MVCCDatabaseCoordinator``).
  Each instance's poller is wrapped (:class:`_ReportingPoller`): what a
  poll learns past the newest tid this process reported (``R``) is
  reported, in order, so that the process's reports form one contiguous
  chain ``(R, to]`` (invariant 4):

  * history-preserving: the exact changes, one query of ``object_state``
    (every revision ``(oid, tid)`` with ``R < tid <= to``), unless a pack
    rewrote a transaction of that range (``transaction.packed``), then
    collapsed;
  * history-free: collapsed, each oid with its current tid (RelStorage's
    poll gives only that, and the older changes are gone from the
    database); the sidecar keeps an uncertain interval for it and closes
    its open revision conservatively (docs/architecture.md, "A collapsed
    report").

  A poll that starts past ``R`` (an instance's first poll, which RelStorage
  answers "clear your cache", or the coordinator's index started anew)
  does not resync the host: the gap ``(R, since]`` is queried in the same
  snapshot and reported with it. The host's cache is dropped only when the
  database itself says its history went back: a poll whose tid went
  backwards on a database without replicas (a restored backup, a
  history-free pack that removed the newest transaction), the watcher
  finding the newest tid reported gone, or a ``CacheConsistencyError``;
  then the database is flushed in the sidecar and joined again with a
  proof. With read replicas (``replica-conf``), a
  poll that goes back is a lagging replica: nothing is reported until it
  passes ``R`` again, and its views (below the sidecar's horizon) are
  served as any old view.
- **Loads.** ``load`` looks the oid up in the sidecar at the instance's
  view; a miss loads through RelStorage (its local cache, then the
  database, at the same snapshot) and queues a store of the revision, open,
  seen at the view. ``prefetch`` looks the oids up with one
  ``lookup_many`` and fetches the misses in one query
  (``mover.load_currents``), kept for the loads that follow at that view.

A commit through a wrapper instance writes its states through: after the
commit (``tpc_finish``), each state stored (not blobs, not
conflict-resolved ones) waits until a poll of this process has reported
the commit's tid, then is queued as an open revision at that tid.

Blobs: blob records are cached like any state; blob files are read from
RelStorage's blob directory as before (``loadBlob`` and
``openCommittedBlobFile`` go to RelStorage). A pack through the wrapper
(``DB.pack``, ``storage.pack``) or ``zap_all`` flushes the database in the
sidecar. A watcher thread per process (:meth:`TideCacheRelStorage._tc_watch_once`)
checks, off the request path, what a poll cannot cheaply: that the
database still holds the newest tid reported (a restore under running
workers), that no other process flushed it, and (history-preserving) that
no pack made outside tidecache rewrote it. docs/relstorage.md has the
events that flush and their log lines.
"""

import logging
import threading
import time

import zope.interface
from ZODB.interfaces import IMVCCStorage
from ZODB.utils import p64
from ZODB.utils import tid_repr
from ZODB.utils import u64

from tidecache._native import Client
from tidecache._native import TideCacheError
from tidecache.storage import REJOIN_INTERVAL
from tidecache.storage import RETRY_UNAVAILABLE
from tidecache.storage import WRITE_THROUGH_MAX_BYTES
from tidecache.storage import _Joining
from tidecache.storage import _live
from tidecache.storage import _Stats

logger = logging.getLogger("tidecache")

#: Commits whose write-through waits for the report of their tid; past it
#: the oldest are dropped (their states are loaded again on a read).
PENDING_COMMITS = 64

#: Bound on the oids of one commit reported exactly as this process's own
#: (history-free); a larger commit is reported collapsed.
MAX_EXACT_OIDS = 50000

#: How long (seconds) a horizon may stay neither provable nor contradicted
#: (history-free: its objects all changed since, nothing reported past it)
#: before a joining worker takes it for not proved and flushes.
INCONCLUSIVE_SECONDS = 10.0

#: How often (seconds) the watcher thread asks a history-preserving
#: database whether a pack made outside tidecache (``zodbpack``, another
#: process's plain RelStorage) rewrote its history; one query, off the
#: request path (it scans the transaction log: a fraction of a second on
#: millions of transactions).
PACK_CHECK_SECONDS = 10.0

#: How often (seconds) the watcher thread checks that the database still
#: holds the newest tid this process reported (a backup restored under
#: running workers, which RelStorage's poll answers with "no change") and
#: that the client was not cut off by another process's flush; one or two
#: indexed queries on a connection of its own.
HISTORY_CHECK_SECONDS = 1.0

#: A gap or exact query answering more rows than this is not reported
#: change by change: the sidecar is resynced at its end instead.
MAX_REPORT_ROWS = 200000


def relstorage_database_key(base):
    """The key naming a RelStorage's database in the sidecar (invariant 7):
    ``relstorage:sqlite:<absolute data directory>``,
    ``relstorage:postgresql:<dsn without its password>``,
    ``relstorage:mysql:<connection parameters without the password>``,
    ``relstorage:oracle:<dsn>`` (Oracle is untested). Never contains a
    password: a ``password=`` of a DSN, the password of a
    ``postgresql://user:password@host`` URI and MySQL's ``passwd`` are
    left out."""
    adapter = base._adapter
    name = type(adapter).__name__.lower()
    data_dir = getattr(adapter, "data_dir", None)
    if data_dir:
        return "relstorage:sqlite:%s" % data_dir
    dsn = getattr(adapter, "_dsn", None)
    if dsn is not None:
        kind = "postgresql" if "postgres" in name else "oracle" if "oracle" in name else name
        return "relstorage:%s:%s" % (kind, _without_password(dsn))
    params = getattr(adapter, "_params", None)
    if params is not None:
        shown = ";".join("%s=%s" % (k, params[k]) for k in sorted(params)
                         if k not in ("passwd", "password"))
        return "relstorage:mysql:%s" % shown
    return "relstorage:%s:%s" % (name, base.getName())


def _without_password(dsn):
    """``dsn`` (``key=value`` words or a URI) without its password."""
    if "://" in dsn:
        scheme, rest = dsn.split("://", 1)
        netloc, sep, path = rest.partition("/")
        if "@" in netloc:
            creds, host = netloc.rsplit("@", 1)
            netloc = creds.split(":", 1)[0] + "@" + host
        rest = netloc + sep + path
        query = ""
        if "?" in rest:
            rest, query = rest.split("?", 1)
            query = "&".join(p for p in query.split("&") if not p.lower().startswith("password="))
        return scheme + "://" + rest + ("?" + query if query else "")
    pairs = _conninfo_pairs(dsn)
    if pairs is None:
        # libpq would refuse it too; nothing of it is shown.
        return "(a DSN that does not parse)"
    return " ".join("%s=%s" % (k, raw) for k, raw in pairs if k.lower() != "password")


def _conninfo_pairs(dsn):
    """``(keyword, value as written)`` of a libpq ``keyword = value`` DSN:
    spaces around ``=`` are allowed, a value is single-quoted (``\\'``
    and ``\\\\`` inside) or runs to the next space (``\\`` escapes in
    it). ``None`` if it does not parse."""
    pairs, i, n = [], 0, len(dsn)
    while True:
        while i < n and dsn[i].isspace():
            i += 1
        if i == n:
            return pairs
        start = i
        while i < n and not dsn[i].isspace() and dsn[i] != "=":
            i += 1
        keyword = dsn[start:i]
        while i < n and dsn[i].isspace():
            i += 1
        if not keyword or i == n or dsn[i] != "=":
            return None
        i += 1
        while i < n and dsn[i].isspace():
            i += 1
        start = i
        if i < n and dsn[i] == "'":
            i += 1
            while i < n and dsn[i] != "'":
                i += 2 if dsn[i] == "\\" else 1
            if i >= n:
                return None
            i += 1
        else:
            while i < n and not dsn[i].isspace():
                i += 2 if dsn[i] == "\\" else 1
        pairs.append((keyword, dsn[start:min(i, n)]))


class _Changes:
    """The SQL of reports, bound to an adapter's dialect the way
    RelStorage's own queries are (its query objects find the dialect
    through the ``driver`` attribute of the object they are read from)."""

    def __init__(self, poller):
        self.driver = poller.driver
        self.keep_history = poller.keep_history

    # Imported lazily: RelStorage is optional for tidecache.
    @classmethod
    def _queries(cls):
        if "_all_query" in cls.__dict__:
            return
        from relstorage.adapters.schema import Schema

        state = Schema.object_state
        # Every row of object_state in (frm, to]: in a history-preserving
        # database every revision (exact), in a history-free one each
        # oid's current revision (collapsed).
        cls._all_query = state.select(state.c.zoid, state.c.tid).where(
            state.c.tid > state.bindparam("frm")).and_(state.c.tid <= state.bindparam("to")).prepared()
        current = Schema.all_current_object
        cls._current_query = current.select(current.c.zoid, current.c.tid).where(
            current.c.tid > current.bindparam("frm")).and_(current.c.tid <= current.bindparam("to")).prepared()
        cls._tid_query = state.select(state.c.zoid).where(
            state.c.tid == state.bindparam("tid")).limit(1).prepared()
        txn = Schema.transaction
        from relstorage.adapters.sql import func

        cls._newest_packed_query = txn.select(func.max(txn.c.tid)).where(
            txn.c.packed == True).prepared()  # noqa: E712
        cls._txn_query = txn.select(txn.c.tid).where(txn.c.tid == txn.bindparam("tid")).prepared()
        every = Schema.all_transaction
        cls._newest_query = every.select(func.max(every.c.tid)).prepared()
        cls._packed_query = txn.select(txn.c.tid).where(
            txn.c.tid > txn.bindparam("frm")).and_(txn.c.tid <= txn.bindparam("to")).and_(
            txn.c.packed == True).prepared()  # noqa: E712 (RelStorage's SQL builder)

    def holds_tid(self, cursor, tid):
        """Whether some revision in ``cursor``'s snapshot has serial
        ``tid`` (in a history-free database: some oid's current one)."""
        self._queries()
        self._tid_query.execute(cursor, {"tid": tid})
        return bool(cursor.fetchall())

    def newest_packed(self, cursor):
        """The newest tid a pack rewrote (history-preserving: the newest
        transaction marked ``packed``; 0 if none); ``None`` in a
        history-free database, which has no transaction log."""
        if not self.keep_history:
            return None
        self._queries()
        self._newest_packed_query.execute(cursor)
        rows = cursor.fetchall()
        return int(rows[0][0] or 0) if rows else 0

    def holds_reported(self, cursor, tid):
        """``(holds, newest)``: whether ``cursor``'s snapshot still holds the
        reported tid ``tid`` (history-preserving: its transaction row;
        history-free: a newest tid at or past it), and the newest tid."""
        self._queries()
        newest = self.get_current_tid(cursor)
        if newest < tid:
            return False, newest
        if self.keep_history:
            self._txn_query.execute(cursor, {"tid": tid})
            return bool(cursor.fetchall()), newest
        return True, newest

    def get_current_tid(self, cursor):
        self._queries()
        self._newest_query.execute(cursor)
        rows = cursor.fetchall()
        return int(rows[0][0] or 0) if rows else 0

    def between(self, cursor, frm, to):
        """``(exact, [(oid, tid), ...])``: the changes of ``(frm, to]`` in
        ``cursor``'s snapshot; exact (every change with its tid) in a
        history-preserving database whose range no pack rewrote, else
        collapsed (each oid with its current tid)."""
        self._queries()
        params = {"frm": frm, "to": to}
        if self.keep_history:
            self._packed_query.execute(cursor, params)
            if not cursor.fetchall():
                self._all_query.execute(cursor, params)
                return True, [(int(o), int(t)) for o, t in cursor.fetchall()]
            self._current_query.execute(cursor, params)
            return False, [(int(o), int(t)) for o, t in cursor.fetchall()]
        self._all_query.execute(cursor, params)
        return False, [(int(o), int(t)) for o, t in cursor.fetchall()]


class _ReportingPoller:
    """Wraps an instance adapter's poller: RelStorage's answer is returned
    unchanged; what the poll learned past the newest tid this process
    reported is reported (see the module's docstring)."""

    def __init__(self, inner, root):
        self._tc_inner = inner
        self._tc_root = root
        self._tc_changes = _Changes(inner)

    def __getattr__(self, name):
        return getattr(self._tc_inner, name)

    def __setattr__(self, name, value):
        # RelStorage's options live on its poller (e.g.
        # ``transactions_may_go_backwards``): set there, not on the wrapper.
        if name.startswith("_tc_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._tc_inner, name, value)

    def get_current_tid(self, cursor):
        """RelStorage's first poll of a coordinator: the newest tid, no
        changes ("clear your cache"). The changes past ``R`` are queried
        and reported."""
        tid = self._tc_inner.get_current_tid(cursor)
        self._tc_root._tc_learned(self._tc_changes, cursor, None, tid, None)
        return tid

    def poll_invalidations(self, conn, cursor, prev_polled_tid):
        """RelStorage's poll ``(since, polled]``: its changes (each oid's
        newest tid) are reported past ``R``; a poll that goes backwards is
        told to the root."""
        try:
            changes, polled = self._tc_inner.poll_invalidations(conn, cursor, prev_polled_tid)
        except Exception as e:
            from relstorage.adapters.interfaces import StaleConnectionError

            if isinstance(e, StaleConnectionError):
                self._tc_root._tc_went_back(prev_polled_tid, None, str(e))
            raise
        if prev_polled_tid is not None and polled < prev_polled_tid:
            self._tc_root._tc_went_back(prev_polled_tid, polled, "poll went backwards")
        elif changes is not None:
            changes = list(changes)
            self._tc_root._tc_learned(self._tc_changes, cursor, prev_polled_tid, polled, changes)
        else:
            # "Clear your cache" without going back (no previous tid): the
            # changes past R are queried.
            self._tc_root._tc_learned(self._tc_changes, cursor, None, polled, None)
        return changes, polled


class _Polling:
    """A RelStorage as the attach's proof sees it: ``sync()`` polls
    (RelStorage's own ``sync`` only rolls back, and its
    ``lastTransaction`` moves at the next poll); the rest is RelStorage's."""

    def __init__(self, storage):
        self._storage = storage

    def sync(self):
        self._storage.sync()
        self._storage.poll_invalidations()

    def __getattr__(self, name):
        return getattr(self._storage, name)


class _Primary:
    """The primary database, through a store connection, as the attach's
    proof sees it, where load connections go to read replicas
    (``ro-replica-conf``) that may lag: a lagging replica must not be taken
    for a restored backup."""

    def __init__(self, instance, conn):
        self._adapter = instance._adapter
        self.keep_history = instance.keep_history
        self.cursor = conn.cursor
        # For the history-free proof, which reads ``_load_connection.cursor``.
        self._load_connection = self

    def sync(self):
        """A store connection reads committed data at each statement."""

    def lastTransaction(self):
        return p64(self._adapter.txncontrol.get_tid(self.cursor))

    def loadBefore(self, oid, tid):
        o = u64(oid)
        state, start = self._adapter.mover.load_before(self.cursor, o, u64(tid))
        if start is None:
            return None
        end = self._adapter.mover.get_object_tid_after(self.cursor, o, start)
        return state, p64(start), (p64(end) if end else None)


@zope.interface.implementer(IMVCCStorage)
class TideCacheRelStorage(_Joining):
    """Wraps a RelStorage ``base`` (history-free or history-preserving) and
    caches its revisions in the ``tidecached`` sidecar listening on
    ``socket``; made by :class:`tidecache.TideCacheStorage` when given a
    RelStorage.

    :param base: the RelStorage (the root storage, not an instance).
    :param socket: path of the sidecar's Unix socket.
    :param database: the database's key in the sidecar; default
        :func:`relstorage_database_key` (no password in it).
    :param timeout_ms: bound on each call to the sidecar, milliseconds;
        past it the call is a miss.
    :raises TypeError: ``base`` is not a RelStorage this version knows
        (its private attributes that tidecache reads are missing).
    """

    def __init__(self, base, socket, database=None, timeout_ms=50):
        try:
            from relstorage.storage import RelStorage
        except ImportError:  # pragma: no cover (RelStorage provides IMVCCStorage here)
            RelStorage = None
        if RelStorage is not None and not isinstance(base, RelStorage) and hasattr(base, "_adapter"):
            raise TypeError(
                "%r wraps a RelStorage: put <tidecache> directly around <relstorage> and the other "
                "wrapper around <tidecache> (e.g. <zlibstorage><tidecache><relstorage>); tidecache "
                "reads RelStorage's own loads, polls and queries, which a wrapper in between would "
                "transform" % (base,))
        for attr in ("_adapter", "_cache", "_load_connection", "new_instance"):
            if not hasattr(base, attr):
                raise TypeError(
                    "%r is an IMVCCStorage but not a RelStorage 3 or 4 (no %s): tidecache wraps "
                    "RelStorage (whose poller and instances' views it reads) and the storages ZODB "
                    "adapts with MVCCAdapter (FileStorage, MappingStorage, ZEO ClientStorage)"
                    % (base, attr))
        self._storage = base
        self._tc_socket = socket
        self._tc_client = Client(socket, database or relstorage_database_key(base), timeout_ms)
        self._tc_stats = _Stats()
        self._tc_lock = threading.Lock()
        self._tc_join_lock = threading.Lock()
        self._tc_joined = False
        self._tc_reported = None
        self._tc_unavailable = False
        self._tc_behind_since = None
        self._tc_next_join = 0.0
        self._tc_worker = None
        self._tc_closing = threading.Event()
        # (tid, [(oid, state), ...]) of this process's commits, waiting for
        # a report that covers their tid.
        self._tc_pending = []
        # (tid, [oid, ...]) deleted by this process's commits
        # (``deleteObject``): a history-free database keeps no row of a
        # deleted object, so no poll lists it; the report covering ``tid``
        # does.
        self._tc_deleted = []
        # {tid: (oids, {oid: previous serial or None})} of this process's
        # commits not reported yet (history-free: see _tc_report_locked).
        self._tc_own = {}
        # Moves at every join and drop: a report computed before one is
        # not sent after it (its rows may be another history's).
        self._tc_epoch = 0
        self._tc_packed = None
        self._tc_inconclusive = {}
        self._tc_next_pack_check = 0.0
        self._tc_watcher = None
        self._tc_watch_connection = None
        # Read replicas (``ro-replica-conf``): load connections may lag
        # behind the primary. (``replica-conf`` alone is a failover list: a
        # poll that goes back there lost transactions, another history.)
        self._tc_replicas = bool(getattr(getattr(base, "_options", None), "ro_replica_conf", None))
        _live.add(self)
        for iface in zope.interface.providedBy(base):
            zope.interface.alsoProvides(self, iface)
        self._tc_hook(base)
        with self._tc_join_lock:
            self._tc_join(wait=True)
        self._tc_start_watcher()

    # -- joining ------------------------------------------------------------

    def _tc_join(self, wait):
        """Attaches (with a proof, :meth:`_Joining._tc_attach`) at the
        ``lastTransaction`` of a RelStorage instance of its own (polled, then
        released: the root's own view is left alone, so that
        ``DB.lastTransaction()`` stays RelStorage's). Joined, ``R`` (the
        newest tid reported) starts at the sidecar's horizon when it is
        behind: the next poll reports what changed since, in one query (no
        recovery thread: RelStorage answers it in one round trip). Called
        with ``_tc_join_lock`` held."""
        instance = self._storage.new_instance()
        try:
            instance.poll_invalidations()
            if self._tc_replicas:
                # Loads go to read replicas, which may lag: the horizon is
                # proved on the primary.
                with instance._store_connection_pool.borrowing() as conn:
                    primary = _Primary(instance, conn)
                    last = u64(primary.lastTransaction())
                    last, joined = self._tc_attach(primary, last, wait)
            else:
                storage = _Polling(instance)
                last = u64(storage.lastTransaction())
                last, joined = self._tc_attach(storage, last, wait)
            packed = self._tc_newest_packed(instance)
            if joined and packed and packed > self._tc_log_start():
                # History-preserving: a pack made after the sidecar's log
                # started, by no process of tidecache (each flushes after its
                # own; running watchers flush after others'): the sidecar may
                # hold revisions the pack removed.
                logger.warning("tidecache: %s was packed (newest packed transaction %s) after the "
                               "sidecar's log of it started, by a process without tidecache: "
                               "flushing the database in the sidecar", self._tc_client.database,
                               tid_repr(p64(packed)))
                self._tc_flush()
                last, joined = self._tc_attach(_Polling(instance), last, wait)
        finally:
            try:
                instance.release()
            except Exception:
                logger.debug("tidecache: releasing the attach's instance failed", exc_info=True)
        horizon = self._tc_client.horizon
        with self._tc_lock:
            self._tc_joined = joined
            self._tc_epoch += 1
            self._tc_packed = packed
            self._tc_next_pack_check = time.monotonic() + PACK_CHECK_SECONDS
            if joined:
                self._tc_reported = min(last, horizon) if horizon else last
            self._tc_pending = []
        if joined and horizon and horizon < last:
            logger.info("tidecache: %s: the sidecar's horizon %s is behind the database (%s); "
                        "the next poll reports what changed since", self._tc_client.database,
                        tid_repr(p64(horizon)), tid_repr(p64(last)))

    def _tc_prove(self, base, horizon, witness, sample):
        """Whether ``base`` provably holds the sidecar's horizon transaction
        ``horizon`` (invariant 7); returns ``(proved, how)``.

        Evidence is what only this history can hold: a witness oid (changed
        at exactly ``horizon``: the oids of an exact report, e.g. a
        process's own commit) whose revision at ``horizon`` is there
        (history-preserving: ``loadBefore(oid, horizon + 1)`` gives serial
        ``horizon``; history-free: its current serial is ``horizon``), or
        any revision with serial ``horizon`` (tids are timestamps, unique
        to a history; a pack keeps the revisions still current, so a
        packed transaction proves as well). A sampled open revision that
        is there is no evidence (a backup restored and committed to since
        holds the revisions older than its copy), but one that is not is a
        contradiction, as is a witness oid without its revision at the
        horizon (history-free: a current serial at or below the horizon and
        another: another history wrote it; one changed or deleted since
        says nothing). Proved when there is evidence and no contradiction; not
        proved (a flush) on a contradiction; ``None`` when there is neither
        (a history-free horizon whose objects were all changed since): the
        attach tries a later horizon, then a later poll does; never a flush
        for it."""
        keep_history = getattr(base, "keep_history", False)
        try:
            storage = getattr(base, "_storage", base)
            cursor = storage._load_connection.cursor
            evidence, contradiction = [], []
            if keep_history:
                for oid in witness:
                    r = base.loadBefore(p64(oid), p64(horizon + 1))
                    (evidence if r is not None and u64(r[1]) == horizon else contradiction).append(oid)
                for oid, serial in sample:
                    r = base.loadBefore(p64(oid), p64(horizon + 1))
                    if r is None or u64(r[1]) != serial:
                        contradiction.append(oid)
            else:
                current = storage._adapter.mover.current_object_tids(
                    cursor, list(witness) + [o for o, _ in sample])
                # An oid without a current revision was deleted since (a
                # garbage collector's deleteObject): it says nothing.
                for oid in witness:
                    tid = current.get(oid)
                    if tid == horizon:
                        evidence.append(oid)
                    elif tid is not None and tid < horizon:
                        contradiction.append(oid)
                for oid, serial in sample:
                    tid = current.get(oid)
                    if tid is not None and tid != serial and tid <= horizon:
                        contradiction.append(oid)
            if contradiction:
                return False, ("oids %s are not at the sidecar's revisions (another history)"
                               % ", ".join(hex(o) for o in contradiction[:4]))
            if evidence:
                return True, "%d witness oids at the horizon" % len(evidence)
            if _Changes(storage._adapter.poller).holds_tid(cursor, horizon):
                return True, "a revision with serial at the horizon"
            # Inconclusive: tried again at a later horizon. A horizon that
            # stays so (nothing reports past it: its commits were made
            # without tidecache, or their process died before its poll)
            # would keep every worker out: past INCONCLUSIVE_SECONDS it is
            # not proved (a flush; the safe side).
            now = time.monotonic()
            first = self._tc_inconclusive.get(horizon)
            if first is None:
                self._tc_inconclusive = {horizon: now}
            elif now - first > INCONCLUSIVE_SECONDS:
                return False, ("the horizon could not be checked for %.0f s (its objects were all "
                               "changed since, and nothing reported past it)" % (now - first))
            return None, ("no revision at the horizon any more (its objects were all changed "
                          "since): nothing to check it against")
        except Exception as e:
            return False, "the proof failed: %r" % (e,)

    def _tc_log_start(self):
        """The tid the sidecar's log of this database starts at (a round
        trip); 0 when it cannot be read."""
        try:
            stats = self._tc_client.stats()["databases"].get(self._tc_client.database)
        except TideCacheError:
            return 0
        return (stats or {}).get("log_start", 0) or 0

    def _tc_newest_packed(self, instance):
        """The newest packed tid in ``instance``'s snapshot, ``None`` if
        unknown (history-free, an error)."""
        try:
            return _Changes(instance._adapter.poller).newest_packed(instance._load_connection.cursor)
        except Exception:
            logger.debug("tidecache: reading the newest packed tid failed", exc_info=True)
            return None

    # -- the watcher: checks off the request path --------------------------------

    def _tc_start_watcher(self):
        """Starts the watcher thread (once per process: again in a forked
        child, from its first poll)."""
        if self._tc_watcher is not None or self._tc_closing.is_set():
            return
        watcher = threading.Thread(target=self._tc_watch, name="tidecache-watch", daemon=True)
        self._tc_watcher = watcher
        watcher.start()

    def _tc_watch(self):
        """The watcher thread: :meth:`_tc_watch_once` every
        ``HISTORY_CHECK_SECONDS`` until :meth:`close`, on a database
        connection of its own, so that no request waits for these
        queries."""
        closing = self._tc_closing
        while not closing.wait(HISTORY_CHECK_SECONDS):
            try:
                self._tc_watch_once()
            except Exception:
                logger.debug("tidecache: the watcher's check failed", exc_info=True)
        connection = self._tc_watch_connection
        if connection is not None:
            connection.drop()

    def _tc_watch_once(self):
        """One round of the checks a poll cannot make cheaply; returns
        whether the database was left (flushed or forgotten).

        - The client was told ``Stale`` (another process flushed the
          database): joined again, in the background.
        - The database still holds ``R``, the newest tid this process
          reported (history-preserving: its transaction; history-free: a
          newest tid at or past it); otherwise it went back in time under
          the running workers (a restore, which RelStorage's poll answers
          "no change"): :meth:`_tc_went_back`.
        - History-preserving, every ``PACK_CHECK_SECONDS``: a pack rewrote
          the history since the join (:meth:`_tc_pack_seen`)."""
        with self._tc_lock:
            joined, reported = self._tc_joined, self._tc_reported
        if not joined or reported is None:
            if not joined:
                self._tc_rejoin()
            return False
        if not self._tc_client.joined:
            self._tc_forget("another process flushed the database in the sidecar")
            self._tc_rejoin()
            return True
        if self._tc_watch_connection is None:
            from relstorage.adapters.connections import LoadConnection

            self._tc_watch_connection = LoadConnection(self._storage._adapter.connmanager)
        with self._tc_lock:
            deleted = bool(self._tc_deleted)
        if deleted:
            # Deletions whose tid another process's report passed first.
            try:
                horizon = self._tc_client.report_now(reported, reported, [])
            except TideCacheError:
                horizon = None
            if horizon is not None:
                with self._tc_lock:
                    if self._tc_joined:
                        self._tc_send_deletions_locked(horizon)
        changes_sql = _Changes(self._storage._adapter.poller)
        now = time.monotonic()
        pack_due = changes_sql.keep_history and now >= self._tc_next_pack_check

        def check(_conn, cursor):
            holds, newest = changes_sql.holds_reported(cursor, reported)
            if not holds:
                self._tc_went_back(reported, newest, "the database no longer holds the newest tid reported")
                with self._tc_lock:
                    return not self._tc_joined
            if pack_due:
                self._tc_next_pack_check = time.monotonic() + PACK_CHECK_SECONDS
                return self._tc_pack_seen(changes_sql, cursor, reported)
            return False

        connection = self._tc_watch_connection
        try:
            return connection.restart_and_call(check)
        finally:
            # RelStorage rolls a load connection back only once its cursor
            # was used as a load's: without this the next check would read
            # this check's snapshot, and take newer reports for a database
            # gone back in time.
            connection.rollback_quietly()

    def _tc_pack_seen(self, changes_sql, cursor, reported):
        """History-preserving: whether a pack rewrote the history since the
        join (the newest ``packed`` transaction moved). A pack through
        another process's wrapper flushed the database already (this
        client's no-op report is answered ``Stale``): joined again without
        a flush. A pack made outside tidecache (``zodbpack``): the database
        is flushed (packed revisions must not be served) and joined again.
        Returns whether it was left."""
        try:
            packed = changes_sql.newest_packed(cursor)
        except Exception:
            logger.debug("tidecache: reading the newest packed tid failed", exc_info=True)
            return False
        with self._tc_lock:
            before = self._tc_packed
        if before is None or packed == before:
            with self._tc_lock:
                self._tc_packed = packed
            return False
        from tidecache._native import StaleError

        try:
            # A no-op report: answered Stale if the database was flushed
            # since this client joined it.
            self._tc_client.report_now(reported, reported, [])
        except StaleError:
            self._tc_forget("a pack through another process's wrapper (it flushed the database)")
            self._tc_rejoin()
            return True
        except TideCacheError:
            return False  # the sidecar is unavailable: checked again later
        logger.warning("tidecache: %s was packed outside tidecache (newest packed transaction %s, "
                       "was %s): flushing the database in the sidecar", self._tc_client.database,
                       tid_repr(p64(packed)), tid_repr(p64(before)))
        self._tc_drop("a pack made outside tidecache")
        return True

    def _tc_rejoin(self):
        """Attaches again when not joined (the sidecar was unavailable, the
        database was flushed): at most once per ``REJOIN_INTERVAL``, from a
        connection's poll, in a daemon thread of its own with an instance
        of its own (RelStorage instances are not shared between threads),
        which :meth:`close` joins."""
        now = time.monotonic()
        if now < self._tc_next_join or self._tc_closing.is_set():
            return
        if not self._tc_join_lock.acquire(blocking=False):
            return
        started = False
        try:
            self._tc_next_join = now + REJOIN_INTERVAL
            if self._tc_joined:
                return
            worker = threading.Thread(target=self._tc_rejoin_run, name="tidecache-rejoin", daemon=True)
            self._tc_worker = worker
            worker.start()
            started = True
        except Exception:
            logger.exception("tidecache: attaching %s again failed", self._tc_client.database)
        finally:
            if not started:
                self._tc_join_lock.release()

    def _tc_rejoin_run(self):
        try:
            if self._tc_closing.is_set():
                return
            self._tc_join(wait=False)
            if self._tc_unavailable:
                self._tc_next_join = time.monotonic() + RETRY_UNAVAILABLE
        except Exception:
            logger.exception("tidecache: attaching %s again failed", self._tc_client.database)
        finally:
            self._tc_join_lock.release()

    def _tc_hook(self, storage):
        """Wraps ``storage``'s adapter's poller (once)."""
        adapter = storage._adapter
        if not isinstance(adapter.poller, _ReportingPoller):
            adapter.poller = _ReportingPoller(adapter.poller, self)

    # -- reports ------------------------------------------------------------

    def _tc_learned(self, changes_sql, cursor, since, to, changes):
        """A poll of this process saw the database at ``to``; ``changes``
        are RelStorage's ``(oid, newest tid)`` of ``(since, to]`` (``since``
        ``None`` and ``changes`` ``None``: a first poll, no changes). Reports
        ``(R, to]``, then releases the write-through of commits it covers.
        Called in the polling thread; the queries run without the lock and
        the result is cut at the ``R`` found under it (any ``R`` at or past
        the query's start gives a right report: exact rows filtered by tid
        stay exact, collapsed ones stay each oid's newest)."""
        with self._tc_lock:
            if not self._tc_joined or self._tc_reported is None:
                joined = False
            else:
                joined = True
                start, epoch = self._tc_reported, self._tc_epoch
        if not joined:
            self._tc_rejoin()
            return
        if not self._tc_client.joined:
            # Another process flushed the database (a pack through its
            # wrapper, a failed proof): this client was told ``Stale``.
            self._tc_forget("another process flushed the database in the sidecar")
            self._tc_rejoin()
            return
        if to <= start:
            return
        exact = False
        try:
            if changes_sql.keep_history or since is None or since > start:
                exact, rows = changes_sql.between(cursor, start, to)
            else:
                rows = changes
        except Exception as e:
            # The report cannot be made: the sidecar cannot be told what
            # changed up to ``to``; its open revisions must go.
            logger.warning("tidecache: %s: querying the changes of (%s, %s] failed (%s: %s): "
                           "resyncing the sidecar", self._tc_client.database,
                           tid_repr(p64(start)), tid_repr(p64(to)), type(e).__name__, e)
            rows = None
        if rows is not None and len(rows) > MAX_REPORT_ROWS:
            logger.warning("tidecache: %s: %d changes in (%s, %s]: resyncing the sidecar rather "
                           "than reporting them", self._tc_client.database, len(rows),
                           tid_repr(p64(start)), tid_repr(p64(to)))
            rows = None
        with self._tc_lock:
            if (not self._tc_joined or self._tc_reported is None or to <= self._tc_reported
                    or epoch != self._tc_epoch):
                return
            # R only grows within an epoch: frm >= start.
            frm = self._tc_reported
            self._tc_reported = to
            if rows is None:
                self._tc_stats.resyncs += 1
                self._tc_client.resync(to)
            else:
                listed = [(o, t) for o, t in rows if frm < t <= to]
                self._tc_stats.invalidations += len(listed)
                self._tc_report_locked(frm, to, listed, exact)
            self._tc_send_deletions_locked(to)
            if self._tc_own:
                for t in [t for t in self._tc_own if t <= to]:
                    del self._tc_own[t]
            self._tc_release_pending_locked(to)

    def _tc_report_locked(self, frm, to, listed, exact):
        """Sends the report of ``(frm, to]``: exact, or collapsed.

        A history-free report whose newest tid ``to`` is this process's own
        commit (nothing newer was committed when the poll was made) is sent
        as two: the commit exact, ``(to - 1, to]`` with every oid it
        changed (only it wrote rows at ``to``), after a collapsed
        ``(frm, to - 1]`` of the rest: the rows older than ``to``, and each
        of the commit's oids whose previous serial (the one it was stored
        against; no change lies between it and ``to``) is past ``frm``, at
        that serial, or, previous serial unknown (a resolved conflict, an
        undo), at the bound ``to - 1``. So a process's own commit closes
        the previous revisions of its oids exactly, and readers at older
        views keep hitting them; and the sidecar keeps the commit's oids as
        a witness of its horizon."""
        own = None if exact else self._tc_own.get(to)
        if own is not None:
            oids, previous = own
            if not all(o in oids for o, t in listed if t == to):
                own = None  # not only this commit's rows at ``to``: collapsed
        if own is None:
            if exact:
                self._tc_client.report(frm, to, sorted(listed, key=lambda c: c[1]))
            else:
                self._tc_client.report_collapsed(frm, to, listed)
            return
        before = {}
        for o, t in listed:
            if t < to:
                before[o] = max(t, before.get(o, 0))
        for o, p in previous.items():
            if p is None:
                p = to - 1
            if frm < p < to:
                before[o] = max(p, before.get(o, 0))
        if to - 1 > frm:
            self._tc_client.report_collapsed(frm, to - 1, sorted(before.items()))
        self._tc_client.report(to - 1, to, [(o, to) for o in sorted(oids)])

    def _tc_went_back(self, since, polled, why):
        """A poll answered a tid below the one before it. With replicas,
        a lagging replica: nothing to do (nothing is reported until polls
        pass ``R`` again). Without, the database's history went back: the
        sidecar's revisions of it may be another history's, so the database
        is flushed there and joined again (with a proof) from a later
        poll."""
        if self._tc_replicas:
            primary = self._tc_primary_last()
            with self._tc_lock:
                reported = self._tc_reported
            if primary is not None and (reported is None or primary >= reported):
                logger.info("tidecache: %s: a read replica answered a poll behind the one before "
                            "(%s); the primary is at %s: not reporting until the replica catches up",
                            self._tc_client.database, why, tid_repr(p64(primary)))
                return
            why += "; the primary itself is at %s, below the newest tid reported" % (
                tid_repr(p64(primary)) if primary is not None else "an unknown tid")
        from tidecache._native import StaleError

        try:
            # A no-op report: answered Stale if another process flushed the
            # database since this client joined it (a zap_all or a pack
            # through its wrapper): then only join again, no second flush.
            self._tc_client.report_now(since, since, [])
        except StaleError:
            self._tc_forget("another process flushed the database in the sidecar")
            self._tc_rejoin()
            return
        except TideCacheError:
            pass  # unavailable: flushed below (the flush fails the same way and is logged)
        logger.warning("tidecache: %s: the database went back in time (%s; polled %s after %s): "
                       "restored from a backup, or a pack removed its newest transaction? "
                       "Flushing the database in the sidecar.", self._tc_client.database, why,
                       tid_repr(p64(polled)) if polled is not None else "?", tid_repr(p64(since)))
        self._tc_drop("the database went back in time")

    def _tc_primary_last(self):
        """The primary's newest tid (a store connection of an instance of
        its own); ``None`` when it cannot be read."""
        instance = None
        try:
            instance = self._storage.new_instance()
            with instance._store_connection_pool.borrowing() as conn:
                return u64(_Primary(instance, conn).lastTransaction())
        except Exception:
            logger.warning("tidecache: %s: reading the primary's newest tid failed",
                           self._tc_client.database, exc_info=True)
            return None
        finally:
            if instance is not None:
                try:
                    instance.release()
                except Exception:
                    pass

    def _tc_forget(self, why):
        """Leaves the database (joined again from a later poll, with a
        proof): nothing more is reported, stored or looked up until then."""
        logger.info("tidecache: %s: joining the database again (%s)", self._tc_client.database, why)
        with self._tc_lock:
            self._tc_joined = False
            self._tc_reported = None
            self._tc_pending = []
            self._tc_own = {}
            self._tc_epoch += 1
            self._tc_next_join = 0.0

    def _tc_drop(self, why):
        """Flushes the database in the sidecar and leaves it (joined again
        from a later poll, with a proof)."""
        self._tc_forget(why)
        try:
            self._tc_flush()
        except TideCacheError as e:
            logger.warning("tidecache: %s: could not flush the sidecar (%s): %s",
                           self._tc_client.database, why, e)

    def _tc_consistency_error(self, error):
        """RelStorage found the database inconsistent with a poll
        (``CacheConsistencyError``): the database itself says the views
        cannot be trusted."""
        logger.warning("tidecache: %s: RelStorage reports a cache consistency error (%s): "
                       "flushing the database in the sidecar", self._tc_client.database, error)
        self._tc_drop("a cache consistency error")

    # -- write-through --------------------------------------------------------

    def _tc_deleted_at(self, tid, oids):
        """This process's commit ``tid`` deleted ``oids`` (``deleteObject``;
        history-free: no row shows the commit, so no poll can). Told as the
        exact report ``(tid - 1, tid]`` listing them, true on its own (only
        that commit has tid ``tid``, and it changed exactly these oids), once
        the sidecar's horizon is past ``tid`` (it is then contiguous, and a
        change at or below the horizon is still applied: the oids' open
        revisions are closed at ``tid``): right away if this process
        reported past it, else after the report that is
        (:meth:`_tc_send_deletions_locked`) or the watcher's check. The
        horizon is never moved past the database's newest row for it
        (workers joining later could not reach it). Kept across a flush
        (facts of the database's history, not of the sidecar's)."""
        oids = [u64(o) for o in oids]
        with self._tc_lock:
            self._tc_deleted.append((tid, oids))
            del self._tc_deleted[:-PENDING_COMMITS]
            if self._tc_joined and self._tc_reported is not None:
                self._tc_send_deletions_locked(self._tc_reported)

    def _tc_send_deletions_locked(self, horizon):
        """Sends the deletions of commits at or below ``horizon`` (a tid the
        sidecar's horizon has reached, or will before these reports: they
        follow in the same ordered queue)."""
        if not self._tc_deleted:
            return
        keep = []
        for t, oids in self._tc_deleted:
            if t <= horizon:
                self._tc_client.report(t - 1, t, [(o, t) for o in sorted(oids)])
                self._tc_stats.invalidations += len(oids)
            else:
                keep.append((t, oids))
        self._tc_deleted = keep

    def _tc_own_commit(self, tid, previous):
        """This process committed ``tid``, changing the oids of
        ``previous`` (``{oid: serial it was stored against, or None}``,
        8-byte strings):
        kept for the report that reaches ``tid`` (:meth:`_tc_report_locked`)."""
        with self._tc_lock:
            if not self._tc_joined or self._tc_reported is None or tid <= self._tc_reported:
                return
        previous = {u64(o): (u64(s) if s is not None else None) for o, s in previous.items()}
        with self._tc_lock:
            self._tc_own[tid] = (frozenset(previous), previous)
            if len(self._tc_own) > PENDING_COMMITS:
                del self._tc_own[min(self._tc_own)]

    def _tc_committed(self, tid, written):
        """This process committed ``written`` (``{oid: state}``) at
        ``tid``: queued as open revisions once a report covers ``tid``
        (sent before it, a store past the sidecar's horizon is refused).
        Called in the commit's second phase: never raises."""
        try:
            items = [(u64(oid), bytes(data)) for oid, data in written.items()]
            with self._tc_lock:
                if not self._tc_joined or self._tc_reported is None:
                    return
                if tid <= self._tc_reported:
                    self._tc_store_locked(tid, items)
                    return
                self._tc_pending.append((tid, items))
                del self._tc_pending[:-PENDING_COMMITS]
        except Exception:
            logger.exception("tidecache: %s: the write-through of %s failed (the commit stands)",
                             self._tc_client.database, tid_repr(p64(tid)))

    def _tc_release_pending_locked(self, reported):
        if not self._tc_pending:
            return
        keep = []
        for tid, items in self._tc_pending:
            if tid <= reported:
                self._tc_store_locked(tid, items)
            else:
                keep.append((tid, items))
        self._tc_pending = keep

    def _tc_store_locked(self, tid, items):
        store_later = self._tc_client.store_later
        for oid, data in items:
            if store_later(oid, tid, None, data, tid):
                self._tc_stats.stores += 1

    # -- IMVCCStorage -----------------------------------------------------------

    def new_instance(self):
        """A connection's storage: a :class:`TideCacheRelInstance` over a
        new RelStorage instance."""
        instance = self._storage.new_instance()
        self._tc_hook(instance)
        return TideCacheRelInstance(self, instance)

    def undo_instance(self):
        """The storage of ``DB.undo``: a connection's storage (the undo is
        reported by the next poll, as any commit)."""
        return self.new_instance()

    def before_instance(self, before):
        """A read-only storage at the view ``before - 1`` (``DB.open(at=...,
        before=...)``): :class:`TideCacheHistoricalInstance` in a
        history-preserving database; RelStorage's own in a history-free
        one, which keeps no old revision (it answers ``POSKeyError`` for an
        object changed since, where the sidecar may still hold the state
        it had then)."""
        historical = self._storage.before_instance(before)
        if not self._storage.keep_history:
            return historical
        return TideCacheHistoricalInstance(self, historical, u64(before))

    def poll_invalidations(self):
        """The root's poll: RelStorage's (reported like any other)."""
        return self._storage.poll_invalidations()

    def release(self):
        """Releases the root RelStorage's database connections."""
        return self._storage.release()

    # -- plain storage: everything else goes to RelStorage ----------------------

    def __getattr__(self, name):
        if name.startswith("_tc_") or name == "_storage":
            raise AttributeError(name)
        return getattr(self._storage, name)

    def __len__(self):
        return len(self._storage)

    def __repr__(self):
        return "<TideCacheRelStorage %s over %r>" % (self._tc_client.database, self._storage)

    def pack(self, t, referencesf, *args, **kw):
        """Packs the database, then flushes it in the sidecar (packed
        revisions must not be served any more) and joins it again. A pack
        that removes nothing (``check_refs``: ``zodbpack --check-refs``;
        ``prepack_only``: ``zodbpack --prepack``) does not flush."""
        r = self._storage.pack(t, referencesf, *args, **kw)
        names = ("prepack_only", "skip_prepack", "check_refs")
        options = dict(zip(names, args))
        options.update(kw)
        if not (options.get("check_refs") or options.get("prepack_only")):
            self._tc_drop("a pack")
        return r

    def zap_all(self, **kwargs):
        """Empties the database (tests, ``zodbconvert --clear``), then
        flushes it in the sidecar."""
        r = self._storage.zap_all(**kwargs)
        self._tc_drop("zap_all")
        return r

    def close(self):
        """Closes the client (the sidecar releases this process's views) and
        the RelStorage, after a rejoin still running."""
        try:
            self._tc_closing.set()
            for worker in (self._tc_worker, self._tc_watcher):
                if worker is not None and worker is not threading.current_thread():
                    worker.join(30.0)
            self._tc_join_stats_refresh()
            self._tc_client.close()
            self._storage.close()
        finally:
            _live.discard(self)

    def _tc_after_fork(self):
        """In a forked child: new locks in place of the parent's; the
        parent's watcher thread is not here (started again from the first
        poll) and its database connection is the parent's (left alone)."""
        self._tc_lock = threading.Lock()
        self._tc_join_lock = threading.Lock()
        self._tc_worker = None
        self._tc_watcher = None
        self._tc_watch_connection = None
        closing, self._tc_closing = self._tc_closing, threading.Event()
        if closing.is_set():
            self._tc_closing.set()


def _view_of(storage):
    """The view of a RelStorage instance whose load connection has polled:
    the tid its poll saw (``_cache.highest_visible_tid``), or its own last
    commit if that is newer (RelStorage's ``highest_visible_tid``): a
    history-free commit that only deleted objects leaves no row, so the
    poll's tid stays below it although the snapshot holds it. ``None``
    when RelStorage has no view (an empty database, a cache it reset)."""
    polled = storage._cache.highest_visible_tid
    if polled is None:
        return None
    committed = getattr(storage, "_last_tid_i_committed_bytes", None)
    return max(polled, u64(committed)) if committed else polled


class TideCacheRelInstance:
    """One connection's storage: a RelStorage instance whose loads are
    looked up in the sidecar at the instance's view. Everything not
    defined here goes to the RelStorage instance."""

    _tc_view_id = None
    _tc_at = None
    #: ``{oid: state}`` stored in the commit under way; ``None`` outside one.
    _tc_written = None
    #: oids deleted (``deleteObject``) in the commit under way.
    _tc_deleting = None
    #: ``{oid: serial stored against, or None}`` of the commit under way.
    _tc_previous = None

    def __init__(self, root, instance):
        self._storage = instance
        self._tc_root = root
        self._tc_client = root._tc_client
        self._tc_stats = root._tc_stats
        # Prefetched states at the view ``_tc_prefetched_at``.
        self._tc_prefetched = {}
        self._tc_prefetched_at = None
        zope.interface.directlyProvides(self, zope.interface.providedBy(instance))

    def __getattr__(self, name):
        if name.startswith("_tc_") or name == "_storage":
            raise AttributeError(name)
        return getattr(self._storage, name)

    def __len__(self):
        return len(self._storage)

    def __repr__(self):
        return "<TideCacheRelInstance at %s over %r>" % (self._tc_at, self._storage)

    def new_instance(self):
        """Another connection's storage (from the root)."""
        return self._tc_root.new_instance()

    # -- the view --------------------------------------------------------------

    def _tc_view(self):
        """The instance's view, after RelStorage polled if its load
        connection needed it (first use after a rollback); ``None`` when
        there is none (an empty database, a cache RelStorage reset)."""
        storage = self._storage
        # RelStorage's own load does this first: on the first use after a
        # rollback it polls (``__on_load_first_use``) and the view moves.
        storage._load_connection.cursor
        view = _view_of(storage)
        if view is None:
            return None
        if view != self._tc_at:
            self._tc_set_view(view)
        return view

    def _tc_set_view(self, view):
        if self._tc_view_id is None:
            self._tc_view_id = self._tc_client.register_view(view)
        else:
            self._tc_client.advance_view(self._tc_view_id, view)
        self._tc_at = view
        self._tc_prefetched = {}

    def poll_invalidations(self):
        """RelStorage's poll (its reports are made by the poller hook);
        then the instance's view is registered or advanced."""
        try:
            result = self._storage.poll_invalidations()
        finally:
            root = self._tc_root
            if root._tc_watcher is None:
                root._tc_start_watcher()
            if root._tc_joined and not self._tc_client.joined:
                # Another process flushed the database (this client was
                # told ``Stale``): joined again, with a proof.
                root._tc_forget("another process flushed the database in the sidecar")
            if not root._tc_joined:
                root._tc_rejoin()
        view = _view_of(self._storage)
        if view is not None and view != self._tc_at:
            self._tc_set_view(view)
        return result

    def afterCompletion(self):
        """The transaction ended (RelStorage rolls its load connection
        back): the view no longer holds the low-water mark back."""
        self._storage.afterCompletion()
        self._tc_release_view()

    def _tc_release_view(self):
        if self._tc_view_id is not None:
            self._tc_client.release_view(self._tc_view_id)
            self._tc_view_id = None
            self._tc_at = None
            self._tc_prefetched = {}

    def release(self):
        """The connection is discarded: its view and RelStorage's
        connections are released."""
        self._tc_release_view()
        self._storage.release()

    def close(self):
        """As :meth:`release`, then RelStorage's ``close``."""
        self._tc_release_view()
        self._storage.close()

    # -- loads ------------------------------------------------------------------

    def load(self, oid, version=""):
        """``(state, serial)`` of ``oid`` at the instance's view: from the
        sidecar on a hit, else from RelStorage (its local cache or the
        database, at the same snapshot), then queued as an open store seen
        at the view. Raises what RelStorage's ``load`` raises
        (``POSKeyError``)."""
        state, serial, _, _ = self._tc_load_revision(oid)
        return state, serial

    def _tc_shared_view(self):
        """The view (a tid as an int) ``load`` reads at now (touching the
        load connection first, as ``load`` does), ``None`` when there is
        none or it cannot be known: shared state looks templates up at it."""
        try:
            return self._tc_view()
        except Exception:
            return None

    def _tc_load_revision(self, oid):
        """``load`` with what shared state needs to keep the revision:
        ``(state, serial, None, view)``, ``view`` the tid it was read at
        (current there), ``None`` when not known. Raises as ``load``."""
        try:
            view = self._tc_view()
        except Exception:
            # Let RelStorage raise its own error (closed, disconnected).
            state, serial = self._storage.load(oid)
            return state, serial, None, None
        o = u64(oid)
        if view is not None and self._tc_root._tc_joined:
            prefetched = self._tc_prefetched.pop(o, None)
            if prefetched is not None and self._tc_prefetched_at == view:
                self._tc_stats.misses += 1
                self._tc_client.note_miss()
                return prefetched[0], p64(prefetched[1]), None, view
            try:
                hit = self._tc_client.lookup(o, view)
            except TideCacheError as e:
                self._tc_stats.fell_back(self._tc_client, e)
                hit = None
            else:
                if self._tc_stats.falling_back:
                    self._tc_stats.served(self._tc_client)
            if hit is not None:
                self._tc_stats.hits += 1
                return hit[1], p64(hit[0]), None, view
            self._tc_stats.misses += 1
        elif view is not None:
            self._tc_stats.fell_back(self._tc_client, "the database is not joined in the sidecar")
        else:
            self._tc_stats.unavailable += 1
        try:
            state, serial = self._storage.load(oid)
        except Exception as e:
            self._tc_check_consistency(e)
            raise
        if view is not None and state and self._tc_root._tc_joined:
            if self._tc_client.store_later(o, u64(serial), None, state, view):
                self._tc_stats.stores += 1
        return state, serial, None, view

    def _tc_check_consistency(self, error):
        from relstorage.cache.interfaces import CacheConsistencyError

        if isinstance(error, CacheConsistencyError):
            self._tc_root._tc_consistency_error(error)

    def prefetch(self, oids):
        """``Connection.prefetch``: the oids are looked up at the view in
        one ``lookup_many``; the misses are loaded in one query and kept
        for the loads that follow at this view (and stored)."""
        try:
            view = self._tc_view()
        except Exception:
            return self._storage.prefetch(oids)
        if view is None or not self._tc_root._tc_joined:
            return self._storage.prefetch(oids)
        ints = [u64(oid) for oid in oids]
        try:
            hits = self._tc_client.lookup_many(ints, view)
        except TideCacheError:
            hits = [None] * len(ints)
        missing = [o for o, h in zip(ints, hits) if h is None]
        if not missing:
            return None
        storage = self._storage
        try:
            rows = list(storage._adapter.mover.load_currents(storage._load_connection.cursor, missing))
        except Exception:
            logger.debug("tidecache: prefetch through RelStorage failed", exc_info=True)
            return None
        if self._tc_prefetched_at != view:
            self._tc_prefetched = {}
            self._tc_prefetched_at = view
        for oid, state, tid in rows:
            if tid is None or tid > view or not state:
                continue
            self._tc_prefetched[oid] = (state, tid)
            if self._tc_client.store_later(oid, tid, None, state, view):
                self._tc_stats.stores += 1
        return None

    # -- commits: write-through ---------------------------------------------------

    def tpc_begin(self, transaction, *args):
        """Begins the commit; the states stored in it are collected, and
        every oid it changes with the serial it was stored against."""
        r = self._storage.tpc_begin(transaction, *args)
        self._tc_written = {} if not args else None
        self._tc_written_bytes = 0
        self._tc_previous = {} if not args else None
        return r

    def _tc_changing(self, oid, serial):
        previous = self._tc_previous
        if previous is not None:
            # Kept as bytes (converted once, at the commit's registration).
            previous[oid] = serial
            if len(previous) > MAX_EXACT_OIDS:
                # A bulk commit: reported collapsed, like other processes'.
                self._tc_previous = None

    def store(self, oid, serial, data, version, transaction):
        """Stores on RelStorage; ``data`` is kept for the write-through."""
        r = self._storage.store(oid, serial, data, version, transaction)
        self._tc_changing(oid, serial)
        if self._tc_written is not None and data is not None:
            self._tc_written[oid] = data
            self._tc_written_bytes += len(data)
            if self._tc_written_bytes > WRITE_THROUGH_MAX_BYTES:
                # A bulk commit: written through not at all rather than
                # held in memory whole (ZODB spools it through savepoints).
                self._tc_written = None
        return r

    def storeBlob(self, oid, serial, data, blobfilename, version, transaction):
        """Stores a blob; its record is not written through."""
        r = self._storage.storeBlob(oid, serial, data, blobfilename, version, transaction)
        self._tc_changing(oid, serial)
        if self._tc_written is not None:
            self._tc_written.pop(oid, None)
        return r

    def undo(self, transaction_id, transaction):
        """Undoes on RelStorage; the undone oids' previous serials are
        unknown here."""
        r = self._storage.undo(transaction_id, transaction)
        if r:
            for oid in r[1]:
                self._tc_changing(oid, None)
        return r

    def tpc_vote(self, transaction):
        """Votes; oids whose conflicts RelStorage resolved are not written
        through (what was committed is not what was stored), and their
        previous serial is not the one stored against. Deleted oids are
        registered for the report of the commit's tid, known once the vote
        locked the database (before any poll can see it)."""
        r = self._storage.tpc_vote(transaction)
        if r:
            for oid in r:
                self._tc_changing(oid, None)
        if r and self._tc_written:
            for oid in r:
                self._tc_written.pop(oid, None)
        if self._tc_deleting:
            lock = getattr(getattr(self._storage, "_tpc_phase", None), "committing_tid_lock", None)
            tid = getattr(lock, "tid_int", None)
            if tid is not None:
                deleting, self._tc_deleting = self._tc_deleting, None
                self._tc_root._tc_deleted_at(tid, deleting)
        return r

    def deleteObject(self, oid, oldserial, transaction):
        """``IExternalGC.deleteObject``: the oid is listed in the report of
        the commit's tid (no poll lists a deleted object)."""
        r = self._storage.deleteObject(oid, oldserial, transaction)
        self._tc_changing(oid, oldserial)
        if self._tc_deleting is None:
            self._tc_deleting = set()
        self._tc_deleting.add(oid)
        if self._tc_written is not None:
            self._tc_written.pop(oid, None)
        return r

    def tpc_abort(self, transaction, *args, **kw):
        """Aborts; nothing is written through."""
        self._tc_written = None
        self._tc_deleting = None
        self._tc_previous = None
        return self._storage.tpc_abort(transaction, *args, **kw)

    def tpc_finish(self, transaction, func=None):
        """Finishes the commit; its states wait for the report of its tid
        (the next poll of this process), then are stored as open
        revisions."""
        written, self._tc_written = self._tc_written, None
        deleting, self._tc_deleting = self._tc_deleting, None
        previous, self._tc_previous = self._tc_previous, None
        def finish(tid, func=func):
            # In the commit's callback, before this thread polls past it.
            if previous:
                self._tc_root._tc_own_commit(u64(tid), previous)
            if deleting:
                # Not registered at the vote (its tid was not known then).
                self._tc_root._tc_deleted_at(u64(tid), deleting)
            if func is not None:
                func(tid)

        tid = self._storage.tpc_finish(transaction, finish)
        if written:
            self._tc_root._tc_committed(u64(tid), written)
        return tid


class TideCacheHistoricalInstance:
    """A historical connection's storage (``DB.open(at=...)``): read-only,
    at the view ``before - 1``; lookups in the sidecar there, misses loaded
    with ``loadBefore`` (which gives the revision's end) and stored closed
    or open."""

    def __init__(self, root, historical, before):
        self._storage = historical
        self._tc_root = root
        self._tc_client = root._tc_client
        self._tc_stats = root._tc_stats
        self._tc_before = before
        self._tc_view_id = self._tc_client.register_view(before - 1) if before > 0 else None
        zope.interface.directlyProvides(self, zope.interface.providedBy(historical))

    def __getattr__(self, name):
        if name.startswith("_tc_") or name == "_storage":
            raise AttributeError(name)
        return getattr(self._storage, name)

    def load(self, oid, version=""):
        """``(state, serial)`` of ``oid`` at ``before - 1``."""
        data, serial, _, _ = self._tc_load_revision(oid)
        return data, serial

    def _tc_shared_view(self):
        """The view of this historical instance, ``before - 1``."""
        return self._tc_before - 1

    def _tc_load_revision(self, oid):
        """``load`` as ``(state, serial, end, view)`` (see
        ``TideCacheRelInstance._tc_load_revision``)."""
        view = self._tc_before - 1
        o = u64(oid)
        if self._tc_root._tc_joined:
            try:
                hit = self._tc_client.lookup(o, view)
            except TideCacheError:
                hit = None
            if hit is not None:
                self._tc_stats.hits += 1
                return hit[1], p64(hit[0]), None, view
            self._tc_stats.misses += 1
        # HistoricalStorageAdapter's own storage: RelStorage's instance.
        inner = getattr(self._storage, "_storage", self._storage)
        r = inner.loadBefore(oid, p64(self._tc_before))
        if r is None:
            from ZODB.POSException import POSKeyError

            raise POSKeyError(oid)
        data, serial, end = r
        if data and self._tc_root._tc_joined:
            if self._tc_client.store_later(o, u64(serial), u64(end) if end else None, data, view):
                self._tc_stats.stores += 1
        return data, serial, u64(end) if end else None, view

    def prefetch(self, oids):
        """Nothing to prefetch at a fixed historical view."""

    def release(self):
        """Releases the view and RelStorage's instance."""
        if self._tc_view_id is not None:
            self._tc_client.release_view(self._tc_view_id)
            self._tc_view_id = None
        self._storage.release()

    close = release

