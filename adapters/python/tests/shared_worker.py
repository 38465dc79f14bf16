"""Support of the shared-state isolation tests (issue 10), and their
worker process.

As a module: the bases the tests run over (a real ZEO server, FileStorage,
RelStorage/SQLite), each wrapped in ``TideCacheStorage`` on a real
sidecar; databases in three modes (``plain``: ``ZODB.DB``; ``shared``:
``tidecache.DB(..., shared_state=True)``; ``naive``: the same with
``tidecache._native._unsafe_share_containers(True)``, the sharing of
mutable containers that the tests must catch); the reference every value
is checked against (the record the base storage's ``loadBefore`` returns
at a view, decoded as ZODB's ``ObjectReader`` would, references kept
symbolic); connections living on threads of their own (``Actor``); and
the read-modify-commit loops of the concurrency tests (``run_loops``),
for threads, greenlets and processes.

As a script (a worker process over one ZEO server and one sidecar)::

    shared_worker.py threads|gevent zeo|relstorage WHERE SIDECAR_SOCKET MODE WRITERS READERS COMMITS SEED

(``WHERE``: the ZEO server's socket, or RelStorage's SQLite directory)
prints one JSON document (``run_loops``' result) on stdout. ``gevent``
monkey-patches first, before anything imports ``threading`` or
``socket``; it opens RelStorage with its gevent SQLite driver, and reads
ZEO's reference through the wrapped storage's own client (a second ZEO
client in a monkey-patched process fails: "Cannot run the event loop
while another loop is running").
"""

import sys

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "gevent":
    from gevent import monkey

    monkey.patch_all()

import array  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import transaction  # noqa: E402
import ZODB  # noqa: E402
from persistent import Persistent  # noqa: E402
from ZODB.POSException import ConflictError  # noqa: E402
from ZODB.POSException import ReadConflictError  # noqa: E402
from ZODB.utils import p64  # noqa: E402
from ZODB.utils import u64  # noqa: E402

# -- the objects ---------------------------------------------------------


class Item(Persistent):
    """A plain persistent object: its state is its ``__dict__``."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class Mutating(Persistent):
    """A ``__setstate__`` that mutates its argument (a nested list and the
    top-level dict) before handing it on: each activation must start from
    the stored state, whatever other activations did to theirs."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __setstate__(self, state):
        state["tags"].append("set")
        state["activations"] = state.get("activations", 0) + 1
        Persistent.__setstate__(self, state)


class Plain:
    """A non-persistent object held in a persistent state (pickled by
    value, mutable)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __eq__(self, other):
        return type(other) is Plain and vars(self) == vars(other)

    def __repr__(self):
        return "Plain(%r)" % (vars(self),)


class Slotted(Persistent):
    """A persistent object with slots: its state is ``(None, {slot:
    value})``."""

    __slots__ = ("tags", "n")

    def __init__(self, tags, n=0):
        self.tags = tags
        self.n = n


# -- the reference: a record decoded as ZODB reads it ------------------------


class Ref:
    """A persistent reference kept symbolic (its oid)."""

    def __init__(self, reference):
        if isinstance(reference, bytes):
            self.oid = reference
        elif isinstance(reference, tuple):
            self.oid = reference[0]
        elif isinstance(reference, list):  # ['w', (oid,)], ['m', (db, oid, klass)], ...
            args = reference[1] if len(reference) > 1 else ()
            self.oid = args[1] if reference[0] in ("m", "n") else args[0]
        else:
            raise ValueError("unknown persistent reference %r" % (reference,))

    def __repr__(self):
        return "Ref(%x)" % u64(self.oid)


def decode_record(data):
    """``(class, state)`` of a record, references as ``Ref``."""
    from ZODB._compat import PersistentUnpickler
    from ZODB.broken import find_global

    u = PersistentUnpickler(find_global, Ref, io.BytesIO(data))
    klass = u.load()
    if isinstance(klass, tuple):
        klass, _args = klass
        if isinstance(klass, tuple):
            klass = find_global(*klass)
    return klass, u.load()


def norm(v):
    """A comparable, type-tagged form of a value; a persistent object (or a
    ``Ref``, or a ``WeakRef``) becomes its oid."""
    from persistent.wref import WeakRef

    if isinstance(v, WeakRef):
        return ("ref", v.oid)
    if isinstance(v, Persistent):
        return ("ref", v._p_oid)
    if isinstance(v, Ref):
        return ("ref", v.oid)
    if isinstance(v, list):
        return ("list", tuple(norm(x) for x in v))
    if isinstance(v, tuple):
        return ("tuple", tuple(norm(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple(sorted(((norm(k), norm(x)) for k, x in v.items()), key=repr)))
    if isinstance(v, (set, frozenset)):
        return (type(v).__name__, tuple(sorted((norm(x) for x in v), key=repr)))
    if isinstance(v, bytearray):
        return ("bytearray", bytes(v))
    if isinstance(v, Plain):
        return ("Plain", norm(vars(v)))
    if isinstance(v, (collections.deque, array.array)):
        return (type(v).__name__, norm(list(v)))
    return v


def value_of(obj):
    """What a connection holds for ``obj``: its state, normalised (the
    object is activated)."""
    obj._p_activate()
    return norm(obj.__getstate__())


def object_of_record(data):
    """What a plain ZODB connection holds after activating ``data``: a fresh
    object of the record's class (no jar) given the record's state (its
    own ``__setstate__`` run, as ZODB runs it), references as ``Ref``."""
    klass, state = decode_record(data)
    obj = klass.__new__(klass)
    obj.__setstate__(state)
    return obj


def value_of_record(data):
    """``object_of_record``'s value, normalised."""
    return norm(object_of_record(data).__getstate__())


def view_of(conn):
    """The tid a connection's current transaction reads at."""
    instance = conn._normal_storage
    if callable(getattr(type(instance), "_tc_view", None)):  # tidecache's RelStorage instance
        return instance._tc_view()
    # In a savepoint, conn._storage is the TmpStore over the instance.
    return u64(conn._normal_storage._start) - 1


# -- bases ---------------------------------------------------------------


class Base:
    """A database that the tests open ``TideCacheStorage`` databases over,
    with its reference reader. ``open(mode)`` returns a DB; ``record(oid,
    tid)`` the record ``loadBefore(oid, tid + 1)`` returns, read by a plain
    storage."""

    name = None

    def open(self, mode, **kw):
        from tidecache import TideCacheStorage

        storage = TideCacheStorage(self.base(), socket=self.sidecar, database=self.database, timeout_ms=2000)
        return make_db(storage, mode, **kw)

    def record(self, oid, tid):
        """The record ``loadBefore(oid, tid + 1)`` returns (a plain
        storage's)."""
        return self.load_before(oid, tid)[0]

    def serial(self, oid, tid):
        """Its serial."""
        return self.load_before(oid, tid)[1]

    def reference(self, oid, tid):
        return value_of_record(self.record(oid, tid))

    def last(self, db):
        """The newest tid committed (through ``db`` or not)."""
        return u64(db.lastTransaction())

    def close(self):
        pass


class ZEOBase(Base):
    """A ZEO server. The reference is a plain ZEO client of its own, or,
    with ``same_client`` (gevent: ZEO cannot run two clients in one
    monkey-patched process), the wrapped storage's own ZEO client, read
    past tidecache."""

    name = "zeo"

    def __init__(self, address, sidecar, database, same_client=False):
        self.address, self.sidecar, self.database = address, sidecar, database
        self.current = None
        self.plain = None
        if not same_client:
            from ZEO.ClientStorage import ClientStorage

            self.plain = ClientStorage(address, wait_timeout=30)

    def base(self):
        from ZEO.ClientStorage import ClientStorage

        self.current = ClientStorage(self.address, wait_timeout=30)
        return self.current

    def load_before(self, oid, tid):
        client = self.plain if self.plain is not None else self.current
        # A client learns of other clients' commits asynchronously; its
        # cache would take a record for current past a commit it has not
        # heard of yet.
        deadline = time.time() + 30
        while u64(client.lastTransaction()) < tid:
            assert time.time() < deadline, "the reference ZEO client never reached %x" % tid
            time.sleep(0.01)
        return client.loadBefore(oid, p64(tid + 1))

    def close(self):
        if self.plain is not None:
            self.plain.close()


class FileStorageBase(Base):
    """One FileStorage object at a time (it locks its file): the wrapped one,
    whose ``loadBefore`` is also the reference."""

    name = "filestorage"

    def __init__(self, path, sidecar, database):
        self.path, self.sidecar, self.database = path, sidecar, database
        self.current = None

    def base(self):
        import ZODB.FileStorage

        self.current = ZODB.FileStorage.FileStorage(self.path)
        return self.current

    def load_before(self, oid, tid):
        return self.current.loadBefore(oid, p64(tid + 1))


class ExactZEOBase(ZEOBase):
    """A ZEO client not wrapped in tidecache: shared state's exact mode
    (templates by ``(oid, serial)`` as the storage's ``load`` names
    them)."""

    name = "exact-zeo"

    def open(self, mode, **kw):
        return make_db(self.base(), mode, **kw)


class ExactFileStorageBase(FileStorageBase):
    """A FileStorage not wrapped in tidecache (exact mode)."""

    name = "exact-filestorage"

    def open(self, mode, **kw):
        return make_db(self.base(), mode, **kw)


class RelStorageBase(Base):
    """RelStorage over SQLite, history-preserving; the reference is a plain
    RelStorage instance of its own, polled before each read."""

    name = "relstorage-sqlite"

    def __init__(self, data_dir, sidecar, database, driver="sqlite3"):
        self.spec = {"kind": "sqlite", "data_dir": data_dir, "keep_history": True, "driver": driver}
        self.sidecar, self.database = sidecar, database
        self.plain = None

    def base(self):
        from relstorage_worker import open_relstorage

        return open_relstorage(self.spec)

    def _instance(self):
        from relstorage_worker import open_relstorage

        if self.plain is None:
            self.plain = open_relstorage(self.spec)
        # A new instance each time: its snapshot is the database's now.
        instance = self.plain.new_instance()
        instance.poll_invalidations()
        return instance

    def load_before(self, oid, tid):
        instance = self._instance()
        try:
            return instance.loadBefore(oid, p64(tid + 1))
        finally:
            instance.release()

    def last(self, db):
        # The root RelStorage's lastTransaction does not follow its
        # instances' commits.
        instance = self._instance()
        try:
            return u64(instance.lastTransaction())
        finally:
            instance.release()

    def close(self):
        if self.plain is not None:
            self.plain.close()
            self.plain = None


# -- modes ---------------------------------------------------------------


def mechanism():
    """Whether the shared-state mechanism is built (``tidecache.DB``)."""
    import tidecache

    return hasattr(tidecache, "DB")


def make_db(storage, mode, **kw):
    """A database in ``mode``: ``plain``, ``shared``, ``installed``
    (``tidecache.shared.install`` on a ``ZODB.DB``) or ``naive`` (the
    caller turns naive sharing on with ``naive_sharing()``)."""
    if mode == "plain":
        return ZODB.DB(storage, **kw)
    import tidecache

    if mode == "installed":
        from tidecache import shared

        db = ZODB.DB(storage, **kw)
        shared.install(db)
        return db

    return tidecache.DB(storage, shared_state=True, **kw)


@contextlib.contextmanager
def naive_sharing():
    """Mutable containers shared between connections for the duration."""
    from tidecache import _native

    _native._unsafe_share_containers(True)
    try:
        yield
    finally:
        _native._unsafe_share_containers(False)


def mode_context(mode):
    return naive_sharing() if mode == "naive" else contextlib.nullcontext()


def shared_stats(db):
    from tidecache import shared

    return shared.stats(db)


# -- connections on threads of their own ----------------------------------


class Actor:
    """A connection on a thread of its own, with its own transaction
    manager. ``run(fn)`` runs ``fn(actor)`` on that thread and returns its
    result (or raises its exception); ``actor.conn``, ``actor.tm``,
    ``actor.root()``."""

    def __init__(self, db, name=""):
        self.name = name
        self._q = queue.Queue()
        self._thread = threading.Thread(target=self._loop, args=(db,), name="actor-%s" % name, daemon=True)
        self._thread.start()
        self.run(lambda a: None)

    def _loop(self, db):
        try:
            self.tm = transaction.TransactionManager(explicit=False)
            self.conn = db.open(self.tm)
            # A pooled connection may hold objects from before: every
            # actor starts with ghosts.
            self.conn.cacheMinimize()
            self._opened = None
        except BaseException as e:  # reported by the first run()
            self._opened = e
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, box = item
            try:
                if self._opened is not None:
                    raise self._opened
                box["result"] = fn(self)
            except BaseException as e:
                box["error"] = e
            box["done"].set()

    def run(self, fn):
        box = {"done": threading.Event()}
        self._q.put((fn, box))
        # A bound on a hung connection, not a synchronisation.
        if not box["done"].wait(120):
            raise RuntimeError("actor %s did not answer" % self.name)
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def root(self):
        return self.conn.root()

    def close(self):
        def close(a):
            a.tm.abort()
            a.conn.close()

        try:
            self.run(close)
        finally:
            self._q.put(None)
            self._thread.join(60)


# -- read-modify-commit loops (threads, greenlets, processes) --------------

OBJECTS = 4


def setup_counters(db, prefix):
    """``OBJECTS`` counters ``root[prefix + str(i)]``; returns their oids."""
    with db.transaction() as conn:
        for i in range(OBJECTS):
            conn.root()[prefix + str(i)] = Item(n=0, log=[], by={}, pair=(0, []))
    with db.transaction() as conn:
        return [conn.root()[prefix + str(i)]._p_oid for i in range(OBJECTS)]


def consistent(value):
    """A counter's own invariant: ``n`` entries in ``log`` and in the list
    of ``pair``, ``by`` counting them per writer."""
    state = dict(value[1])
    n = state["n"]
    log = state["log"][1]
    pair = state["pair"][1]
    by = dict(state["by"][1])
    return len(log) == n and pair[0] == n and len(pair[1][1]) == n and sum(by.values()) == n


def run_loops(db, reference, prefix, writers, readers, commits, seed, spawn, join):
    """``writers`` workers each commit ``commits`` increments of random
    counters (read-modify-commit, retried on conflicts, at most 50 tries
    each), mutating the nested containers in place; ``readers`` workers
    read every counter in their own transactions and check it against
    ``reference(oid, view)`` (a plain read at the same view) and its own
    invariant. ``spawn(fn)`` starts a thread or greenlet, ``join(h)``
    waits for it. Returns ``{"failures", "commits", "conflicts", "reads",
    "written"}``; ``written`` maps each writer to its entries."""
    with db.transaction() as conn:
        oids = [conn.root()[prefix + str(i)]._p_oid for i in range(OBJECTS)]
    failures = []
    counts = {"commits": 0, "conflicts": 0, "reads": 0}
    written = {}
    done = {"writers": 0}

    def writer(w):
        rnd = random.Random(seed * 1000 + w)
        tm = transaction.TransactionManager(explicit=False)
        conn = db.open(tm)
        mine = written.setdefault(str(w), [])
        try:
            for i in range(commits):
                entry = "%s-s%d-w%d-%d" % (prefix, seed, w, i)
                k = rnd.randrange(OBJECTS)
                for _ in range(50):
                    try:
                        tm.begin()
                        if rnd.random() < 0.3:
                            conn.cacheMinimize()
                        o = conn.root()[prefix + str(k)]
                        o.n += 1
                        o.log.append(entry)
                        o.by[str(w)] = o.by.get(str(w), 0) + 1
                        o.pair[1].append(entry)
                        o.pair = (o.pair[0] + 1, o.pair[1])
                        o._p_changed = True
                        tm.commit()
                        counts["commits"] += 1
                        mine.append([k, entry])
                        break
                    except (ConflictError, ReadConflictError):
                        tm.abort()
                        counts["conflicts"] += 1
                else:
                    failures.append("writer %d: %s not committed in 50 tries" % (w, entry))
        except Exception as e:  # reported, not raised on a thread
            failures.append("writer %d: %r" % (w, e))
        finally:
            tm.abort()
            conn.close()
            done["writers"] += 1

    def reader(r):
        rnd = random.Random(seed * 1000 + 500 + r)
        tm = transaction.TransactionManager(explicit=False)
        conn = db.open(tm)
        try:
            # Bounded: at most this many transactions, and stop once the
            # writers are done (counted, not timed).
            for _ in range(commits * writers * 2 + 10):
                tm.begin()
                if rnd.random() < 0.5:
                    conn.cacheMinimize()
                view = view_of(conn)
                for k in rnd.sample(range(OBJECTS), OBJECTS):
                    o = conn.root()[prefix + str(k)]
                    got = value_of(o)
                    counts["reads"] += 1
                    if not consistent(got):
                        failures.append("reader %d: counter %d inconsistent at %x: %r" % (r, k, view, got))
                    want = reference(oids[k], view)
                    if got != want:
                        failures.append("reader %d: counter %d at %x: %r, plain ZODB reads %r" % (r, k, view, got, want))
                    if len(failures) > 20:
                        return
                tm.abort()
                if done["writers"] == writers:
                    break
        except Exception as e:
            failures.append("reader %d: %r" % (r, e))
        finally:
            tm.abort()
            conn.close()

    handles = [spawn(lambda w=w: writer(w)) for w in range(writers)]
    handles += [spawn(lambda r=r: reader(r)) for r in range(readers)]
    for h in handles:
        join(h)
    return dict(counts, failures=failures, written=written)


def check_totals(db, prefix, written):
    """Every committed entry is in its counter exactly once, and nothing
    else is: a list of what is wrong."""
    wrong = []
    per = {k: [] for k in range(OBJECTS)}
    for entries in written.values():
        for k, entry in entries:
            per[k].append(entry)
    conn = db.open()
    try:
        conn.cacheMinimize()
        for k in range(OBJECTS):
            o = conn.root()[prefix + str(k)]
            if sorted(o.log) != sorted(per[k]) or o.n != len(per[k]) or sorted(o.pair[1]) != sorted(per[k]):
                wrong.append("counter %d: n=%d, %d entries logged, %d committed" % (k, o.n, len(o.log), len(per[k])))
    finally:
        conn.close()
    return wrong


def thread_spawn(fn):
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def thread_join(t):
    t.join(300)
    assert not t.is_alive(), "a worker thread did not finish"


def main(argv):
    kind, where_kind, where, sidecar, mode, writers, readers, commits, seed = argv[1:10]
    writers, readers, commits, seed = int(writers), int(readers), int(commits), int(seed)
    prefix = os.environ.get("SHARED_PREFIX", "p-")
    if where_kind == "zeo":
        base = ZEOBase(where, sidecar, os.environ.get("SHARED_DATABASE", "shared-isolation"),
                       same_client=kind == "gevent")
    else:
        driver = "gevent sqlite3" if kind == "gevent" else "sqlite3"
        base = RelStorageBase(where, sidecar, os.environ.get("SHARED_DATABASE", "shared-isolation-rs"), driver)
    db = base.open(mode, pool_size=writers + readers + 2)
    if kind == "gevent":
        import gevent

        def spawn(fn):
            return gevent.spawn(fn)

        def join(g):
            g.join(300)
            assert g.dead, "a greenlet did not finish"
    else:
        spawn, join = thread_spawn, thread_join
    try:
        result = run_loops(db, base.reference, prefix, writers, readers, commits, seed, spawn, join)
        result["hits"] = shared_stats(db)["hits"] if mode != "plain" else 0
        result["stats"] = shared_stats(db) if mode != "plain" else {}
        if kind == "gevent":
            from gevent import monkey

            result["patched"] = monkey.is_module_patched("threading") and monkey.is_module_patched("socket")
    finally:
        db.close()
        base.close()
    json.dump(result, sys.stdout, default=repr)


if __name__ == "__main__":
    main(sys.argv)
