"""Worker processes of test_relstorage_processes.py and
test_relstorage_gevent.py: ZODB applications over RelStorage wrapped by
``TideCacheStorage``, whose every read is recorded so that the test can
check it against the database's history afterwards.

    relstorage_worker.py writer  SPEC CONTROL_DIR NAME WRITER_INDEX
    relstorage_worker.py reader  SPEC CONTROL_DIR NAME SEED
    relstorage_worker.py gevent  SPEC CONTROL_DIR NAME GREENLETS SECONDS

``SPEC`` is a JSON document naming the database (:func:`open_relstorage`)
and the sidecar's socket. ``CONTROL_DIR`` holds the files through which the
test steers the run (each is read at the start of every transaction, so
the order of events is causal, never timed): ``phase`` (an integer: each
observation is tagged with the phase read before it), ``pause`` (writers
commit nothing while it exists; they say so in their status), ``stop``
(every worker finishes its transaction, writes its result and exits).
Each worker keeps ``NAME.status.json`` up to date (counters per phase) and
writes ``NAME.result.json`` at the end.

The history: writer ``w`` owns the objects ``w<w>k<j>`` (``j`` in
``range(OBJECTS)``); its ``i``-th transaction sets ``{"w": w, "i": i}`` on
object ``j`` when :func:`writes` says so (object 0 every time, object
``j`` every ``j + 1``-th); the setup transaction sets ``i = 0`` on all of
them, and the objects ``still<j>`` never change after it. So the value of
every object at every view follows from the writers' logs of ``(tid, i)``.

An observation is ``[phase, view, key, serial, w, i, hit]``: the view is
the RelStorage instance's own (``_cache.highest_visible_tid``, the
snapshot its load connection reads), ``serial`` and ``(w, i)`` what the
load answered, ``hit`` whether the sidecar answered it.
"""

import sys

if __name__ == "__main__" and sys.argv[1:2] == ["gevent"]:
    # Before anything imports threading, socket or time.
    from gevent import monkey

    monkey.patch_all()

import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

#: Objects per writer; object ``j`` changes every ``j + 1``-th transaction.
OBJECTS = 4
#: Objects that never change after the setup transaction.
STILL = 3


def writes(i, j):
    """Whether the writer's ``i``-th transaction (``i >= 1``) sets its
    object ``j``."""
    return i % (j + 1) == 0


def key(w, j):
    return "w%dk%d" % (w, j)


def open_relstorage(spec, **kw):
    """A RelStorage (root) over the database ``spec`` names: ``kind``
    ``sqlite`` (``data_dir``; ``driver`` ``sqlite3`` or ``gevent
    sqlite3``) or ``postgresql`` (``dsn``); ``keep_history``. Its own
    local cache is off, so that a miss in the sidecar reads the
    database."""
    from relstorage.options import Options
    from relstorage.storage import RelStorage

    kw.setdefault("cache_local_mb", 0)
    if spec["kind"] == "sqlite":
        from relstorage.adapters.sqlite.adapter import Sqlite3Adapter

        options = Options(keep_history=spec["keep_history"], driver=spec.get("driver", "sqlite3"), **kw)
        adapter = Sqlite3Adapter(data_dir=spec["data_dir"], pragmas={}, options=options)
    elif spec["kind"] == "postgresql":
        from relstorage.adapters.postgresql import PostgreSQLAdapter

        options = Options(keep_history=spec["keep_history"], driver=spec.get("driver", "psycopg2"), **kw)
        adapter = PostgreSQLAdapter(dsn=spec["dsn"], options=options)
    else:
        raise ValueError("unknown database kind %r" % (spec["kind"],))
    return RelStorage(adapter, options=options)


def setup(spec, writers):
    """Creates the objects (plain RelStorage, no tidecache); returns the
    setup transaction's tid (``i = 0`` of every writer)."""
    import ZODB
    from persistent.mapping import PersistentMapping
    from ZODB.utils import u64

    db = ZODB.DB(open_relstorage(spec))
    try:
        with db.transaction() as conn:
            root = conn.root()
            for w in range(writers):
                for j in range(OBJECTS):
                    root[key(w, j)] = PersistentMapping(w=w, i=0)
            for j in range(STILL):
                root["still%d" % j] = PersistentMapping(w=-1, i=0)
        return u64(db.lastTransaction())
    finally:
        db.close()


def expected(histories, setup_tid, name, view):
    """``(w, i, serial)`` that ``name`` holds at ``view`` by the writers'
    logs ``{w: [[tid, i], ...]}`` (``i`` = 1, 2, ... in tid order)."""
    import bisect

    if name.startswith("still"):
        return -1, 0, setup_tid
    w, j = (int(x) for x in name[1:].split("k"))
    tids = [t for t, _ in histories[w]]
    n = bisect.bisect_right(tids, view)
    i = n - n % (j + 1)
    return w, i, setup_tid if i == 0 else histories[w][i - 1][0]


def wrong_observations(seen, histories, setup_tid, truth=None):
    """The observations that differ from the history: each
    ``[phase, view, name, serial, w, i, hit]`` against the writers' logs
    and, given ``truth(name, view) -> serial`` (a plain RelStorage's
    ``loadBefore``), against the database. Returns a list of messages."""
    for w, h in histories.items():
        assert [i for _, i in h] == list(range(1, len(h) + 1)), "writer %s's log has a gap" % w
        assert [t for t, _ in h] == sorted(t for t, _ in h) and all(t > setup_tid for t, _ in h)
    wrong = []
    for phase, view, name, serial, w, i, hit in seen:
        if view is None:
            wrong.append("%s read without a view (phase %s)" % (name, phase))
            continue
        want = expected(histories, setup_tid, name, view)
        if (w, i, serial) != want:
            wrong.append("%s at view %x (phase %s, %s): read w=%s i=%s serial %x, history says "
                         "w=%s i=%s serial %x" % (name, view, phase, "hit" if hit else "miss",
                                                  w, i, serial, want[0], want[1], want[2]))
        elif truth is not None and truth(name, view) != serial:
            wrong.append("%s at view %x (phase %s, %s): serial %x, loadBefore says %x"
                         % (name, view, phase, "hit" if hit else "miss", serial, truth(name, view)))
    return wrong


class LoadBefore:
    """``truth(name, view)``: the serial of ``root[name]`` at ``view`` by a
    plain RelStorage's ``loadBefore`` (history-preserving databases)."""

    def __init__(self, spec):
        import ZODB

        self.db = ZODB.DB(open_relstorage(spec))
        with self.db.transaction() as conn:
            self.oids = {k: conn.root()[k]._p_oid for k in conn.root().keys()}
        self.instance = self.db.storage.new_instance()
        self.instance.poll_invalidations()
        self.memo = {}

    def __call__(self, name, view):
        from ZODB.utils import p64
        from ZODB.utils import u64

        k = (name, view)
        if k not in self.memo:
            r = self.instance.loadBefore(self.oids[name], p64(view + 1))
            self.memo[k] = None if r is None else u64(r[1])
        return self.memo[k]

    def close(self):
        self.instance.release()
        self.db.close()


class Control:
    """The files of ``CONTROL_DIR`` (see the module's docstring)."""

    def __init__(self, directory, name):
        self.directory = directory
        self.name = name

    def phase(self):
        try:
            with open(os.path.join(self.directory, "phase")) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def paused(self):
        return os.path.exists(os.path.join(self.directory, "pause"))

    def stopped(self):
        return os.path.exists(os.path.join(self.directory, "stop"))

    def write(self, suffix, doc):
        path = os.path.join(self.directory, "%s.%s.json" % (self.name, suffix))
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)


class Recorder:
    """Loads through a ZODB connection, one observation per load."""

    def __init__(self, storage):
        self.storage = storage
        self.seen = []
        # Per phase: observations, hits, hits of the ``still`` objects.
        self.counts = {}

    def count(self, phase, what, n=1):
        c = self.counts.setdefault(str(phase), {"obs": 0, "hits": 0, "still_hits": 0, "txns": 0})
        c[what] += n

    def read(self, conn, phase, name):
        """Loads ``root[name]`` (a ghost after ``cacheMinimize``) through
        the storage and records what it answered at which view."""
        from ZODB.utils import u64

        stats = self.storage._tc_stats
        obj = conn.root()[name]
        obj._p_deactivate()
        before = stats.hits
        obj._p_activate()
        hit = stats.hits > before
        # The instance's view (RelStorage's own): the snapshot its load
        # connection read; after the load, which polls if it must.
        view = conn._storage._storage._cache.highest_visible_tid
        self.seen.append([phase, view, name, u64(obj._p_serial), obj["w"], obj["i"], hit])
        self.count(phase, "obs")
        if hit:
            self.count(phase, "hits")
            if name.startswith("still"):
                self.count(phase, "still_hits")
        return obj


def open_db(spec):
    import ZODB

    from tidecache import TideCacheStorage

    storage = TideCacheStorage(open_relstorage(spec), socket=spec["sidecar"],
                               timeout_ms=spec.get("timeout_ms", 50))
    return storage, ZODB.DB(storage, cache_size=0, pool_size=16)


def all_keys(writers):
    return [key(w, j) for w in range(writers) for j in range(OBJECTS)] + ["still%d" % j for j in range(STILL)]


def writer(spec, control, w):
    """Commits transactions 1, 2, ... until ``stop`` (none while
    ``pause``); before each, reads its objects through the cache (each
    read recorded). Result: ``history`` ``[[tid, i], ...]``."""
    import transaction

    storage, db = open_db(spec)
    rec = Recorder(storage)
    history = []
    i = 0
    try:
        while not control.stopped():
            if control.paused():
                control.write("status", {"counts": rec.counts, "commits": i, "paused": True,
                                         "last": history[-1][0] if history else None,
                                         "client": client_state(storage)})
                time.sleep(0.01)
                continue
            phase = control.phase()
            i += 1
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            conn.cacheMinimize()
            objs = [rec.read(conn, phase, key(w, j)) for j in range(OBJECTS)]
            for j, obj in enumerate(objs):
                if writes(i, j):
                    obj["i"] = i
            tm.commit()
            history.append([u64_serial(objs[0]), i])
            rec.count(phase, "txns")
            conn.close()
            control.write("status", {"counts": rec.counts, "commits": i, "paused": False,
                                     "last": history[-1][0], "client": client_state(storage)})
    except BaseException:
        error = traceback.format_exc()
        raise
    else:
        error = None
    finally:
        # Written on an error too: what was read before it is checked.
        control.write("result", {"history": history, "seen": rec.seen, "counts": rec.counts,
                                 "error": error, "stats": stats_of(storage)})
        db.close()


def client_state(storage):
    """What the status shows of the adapter and its client (no call to
    the sidecar)."""
    client = storage._tc_client
    return {"joined": storage._tc_joined, "attached": client.attached, "connected": client.connected,
            "horizon": client.horizon, "reported": storage._tc_reported,
            "local": storage._tc_stats.as_dict(), "outbox": list(client.outbox_counts)}


def stats_of(storage):
    try:
        return storage.cache_stats()
    except Exception as e:
        return repr(e)


def u64_serial(obj):
    from ZODB.utils import u64

    return u64(obj._p_serial)


def reader(spec, control, seed, writers):
    """Several connections, each its own transaction manager: each turn one
    of them either ends its transaction (a new view at its next load) or
    goes on in the same one (an older and older view), ghosts its objects
    and reads some of them again; every load recorded."""
    import transaction

    rnd = random.Random(seed)
    storage, db = open_db(spec)
    rec = Recorder(storage)
    keys = all_keys(writers)
    conns = []
    for _ in range(3):
        tm = transaction.TransactionManager()
        conns.append((tm, db.open(tm)))
    first = None
    try:
        while not control.stopped():
            phase = control.phase()
            tm, conn = rnd.choice(conns)
            if rnd.random() < 0.4:
                tm.abort()
            conn.cacheMinimize()
            if first is None:
                # The first turn reads every object (the late worker's
                # "hits at once").
                names = keys
            else:
                names = rnd.sample(keys, 5) + ["still%d" % rnd.randrange(STILL)]
            hits = rec.counts.get(str(phase), {}).get("hits", 0)
            for name in names:
                rec.read(conn, phase, name)
            rec.count(phase, "txns")
            if first is None:
                first = {"phase": phase, "reads": len(names),
                         "hits": rec.counts[str(phase)]["hits"] - hits}
            control.write("status", {"counts": rec.counts, "first": first,
                                     "view": conn._storage._storage._cache.highest_visible_tid,
                                     "client": client_state(storage)})
    except BaseException:
        error = traceback.format_exc()
        raise
    else:
        error = None
    finally:
        control.write("result", {"seen": rec.seen, "counts": rec.counts, "first": first,
                                 "error": error, "stats": stats_of(storage)})
        for tm, conn in conns:
            try:
                tm.abort()
                conn.close()
            except Exception:
                pass
        db.close()


def gevent_run(spec, control, greenlets, seconds):
    """One process, monkey-patched: ``greenlets`` greenlets, each with its
    own connection, each writer ``w`` of its objects and reader of all of
    them (every load recorded), until ``stop`` (or ``seconds``, a bound
    for a test that lost its parent); and a ticker greenlet that measures
    how late the hub wakes it (the longest time the hub was blocked), per
    phase."""
    import gevent
    import transaction

    storage, db = open_db(spec)
    rec = Recorder(storage)
    histories = {w: [] for w in range(greenlets)}
    errors = []
    done = []
    lateness = {}
    keys = all_keys(greenlets)
    deadline = time.monotonic() + seconds

    def ticker():
        while not done:
            phase = str(control.phase())
            t0 = time.perf_counter()
            gevent.sleep(0.005)
            late = time.perf_counter() - t0 - 0.005
            lateness[phase] = max(lateness.get(phase, 0.0), late)

    def work(w):
        rnd = random.Random(w)
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        i = 0
        try:
            while time.monotonic() < deadline and not control.stopped():
                phase = control.phase()
                conn.cacheMinimize()
                for name in rnd.sample(keys, 6):
                    rec.read(conn, phase, name)
                if rnd.random() < 0.5:
                    # Commit this greenlet's objects (read in this
                    # transaction first, so they are checked as well).
                    i += 1
                    objs = [rec.read(conn, phase, key(w, j)) for j in range(OBJECTS)]
                    for j, obj in enumerate(objs):
                        if writes(i, j):
                            obj["i"] = i
                    tm.commit()
                    histories[w].append([u64_serial(objs[0]), i])
                else:
                    tm.abort()
                rec.count(phase, "txns")
                control.write("status", {"counts": rec.counts, "client": client_state(storage),
                                         "commits": {str(k): len(h) for k, h in histories.items()}})
                gevent.sleep(0)
        except Exception:
            errors.append(traceback.format_exc())
            tm.abort()
        finally:
            conn.close()

    tick = gevent.spawn(ticker)
    gevent.joinall([gevent.spawn(work, w) for w in range(greenlets)])
    done.append(True)
    tick.join()
    out = {"histories": {str(w): h for w, h in histories.items()}, "seen": rec.seen,
           "counts": rec.counts, "errors": errors, "lateness": lateness,
           "stats": stats_of(storage)}
    db.close()
    control.write("result", out)


# -- the test's side -------------------------------------------------------


class Stopped(Exception):
    """A worker died, or a wait timed out: the run stops, what was read
    is checked, then the test fails."""


class Run:
    """The test's side of a run: the worker processes (this module run as
    a script) and their control directory."""

    def __init__(self, spec, directory):
        self.spec = spec
        self.dir = directory
        self.procs = {}
        self.set_phase(0)

    def start(self, role, name, *args):
        log = open(os.path.join(self.dir, name + ".log"), "wb")
        self.procs[name] = subprocess.Popen(
            [sys.executable, __file__, role, json.dumps(self.spec), self.dir, name] + [str(a) for a in args],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def set_phase(self, phase):
        tmp = os.path.join(self.dir, "phase.tmp")
        with open(tmp, "w") as f:
            f.write(str(phase))
        os.replace(tmp, os.path.join(self.dir, "phase"))

    def flag(self, name, on):
        path = os.path.join(self.dir, name)
        if on:
            open(path, "w").close()
        elif os.path.exists(path):
            os.remove(path)

    def status(self, name):
        try:
            with open(os.path.join(self.dir, name + ".status.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def count(self, name, phase, what):
        s = self.status(name)
        return 0 if s is None else s["counts"].get(str(phase), {}).get(what, 0)

    def log(self, name, tail=4000):
        with open(os.path.join(self.dir, name + ".log"), errors="replace") as f:
            return f.read()[-tail:]

    def wait(self, what, cond, timeout=90.0):
        """Polls ``cond()`` until true; raises :class:`Stopped` (with the
        workers' logs) after ``timeout`` seconds or when a worker died."""
        deadline = time.monotonic() + timeout
        while not cond():
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise Stopped("worker %s exited (%s) while waiting for %s:\n%s"
                                  % (name, p.returncode, what, self.log(name)))
            if time.monotonic() > deadline:
                raise Stopped("timed out waiting for %s:\n%s" % (
                    what, "\n".join("%s: %s" % (n, self.status(n)) for n in self.procs)))
            time.sleep(0.02)

    def finish(self):
        """Stops the workers; returns ``(results, failures)``: their
        results (also of one that failed, up to its failure) and what went
        wrong with them."""
        self.flag("pause", False)
        self.flag("stop", True)
        results, failures = {}, []
        for name, p in self.procs.items():
            try:
                p.wait(90.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.returncode != 0:
                failures.append("worker %s exited %s:\n%s" % (name, p.returncode, self.log(name)))
            try:
                with open(os.path.join(self.dir, name + ".result.json")) as f:
                    results[name] = json.load(f)
            except OSError:
                failures.append("worker %s wrote no result" % name)
        return results, failures

    def kill_all(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


@contextlib.contextmanager
def run_of(spec):
    with tempfile.TemporaryDirectory(prefix="rs-procs-") as d:
        run = Run(spec, d)
        try:
            yield run
        finally:
            run.kill_all()


def main(argv):
    import logging

    # The adapter's attaches, proofs, flushes and resyncs, timed, in the
    # worker's log (the test shows them when it fails).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("tidecache").setLevel(logging.INFO)
    role, spec_json, directory, name = argv[1:5]
    spec = json.loads(spec_json)
    control = Control(directory, name)
    if role == "writer":
        writer(spec, control, int(argv[5]))
    elif role == "reader":
        reader(spec, control, int(argv[5]), spec["writers"])
    elif role == "gevent":
        gevent_run(spec, control, int(argv[5]), float(argv[6]))
    else:
        raise SystemExit("unknown role %r" % role)


if __name__ == "__main__":
    main(sys.argv)
