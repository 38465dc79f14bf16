"""Writers and readers in separate processes over one RelStorage database
(SQLite history-free and history-preserving; PostgreSQL when a server can
be started) and one sidecar, which is killed (SIGKILL) midway and
restarted: no read, in any process, at any view, differs from the
database's history at that view (invariant 1 across processes, through
RelStorage's polls, collapsed and exact reports, a dead sidecar and a warm
restart), and the cache is used before the kill, after the restart, and at
once by a process started late.

Each load is recorded by the workers (``relstorage_worker.py``) with the
view of its RelStorage instance; after the run every one is checked
against the writers' logs of committed values by tid and, in a
history-preserving database, against a plain RelStorage's ``loadBefore``.
The run is steered through control files (phases, pause, stop), never by
sleeps: each wait polls, with a bound, for what the workers report.
"""

import itertools
import pathlib
import sys
import tempfile
import time

import pytest

pytest.importorskip("relstorage")

import relstorage_worker  # noqa: E402
from relstorage_worker import LoadBefore  # noqa: E402
from relstorage_worker import Stopped  # noqa: E402
from relstorage_worker import run_of  # noqa: E402
from relstorage_worker import wrong_observations  # noqa: E402

from tidecache.relstorage import relstorage_database_key  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[3]
WRITERS = 2
READERS = 2


@pytest.fixture(scope="module")
def postgresql():
    """A PostgreSQL server for the module (bench/dbservers.py); skips when
    its software cannot be installed here."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import dbservers
    finally:
        sys.path.remove(str(ROOT / "bench"))
    pytest.importorskip("psycopg2")
    try:
        server = dbservers.postgresql_server()
        pg = server.__enter__()
    except dbservers.DatabaseServerUnavailable as e:
        pytest.skip(str(e))
    try:
        yield pg
    finally:
        server.__exit__(None, None, None)


_DATABASE_NUMBERS = itertools.count()

DATABASES = [("sqlite", False), ("sqlite", True), ("postgresql", False), ("postgresql", True)]


@pytest.fixture(params=DATABASES, ids=["sqlite-history-free", "sqlite-history-preserving",
                                       "postgresql-history-free", "postgresql-history-preserving"])
def database(request):
    """The spec of an empty database (see ``relstorage_worker.open_relstorage``)."""
    kind, keep_history = request.param
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="rs-sqlite-") as d:
            yield {"kind": "sqlite", "data_dir": d, "keep_history": keep_history}
    else:
        pg = request.getfixturevalue("postgresql")
        # A database of its own per test (the server is the module's).
        name = "procs_%s_%d" % ("hp" if keep_history else "hf", next(_DATABASE_NUMBERS))
        pg.create_database(name)
        yield {"kind": "postgresql", "dsn": pg.dsn_for(name), "keep_history": keep_history}


def test_no_process_reads_outside_its_view_across_a_sidecar_kill(database, sidecar):
    # A call to the sidecar may take up to 1 s before it counts as a miss:
    # on a busy machine the default 50 ms makes attaches fail at start-up;
    # such a process joins later, and in a history-free database that
    # join may flush (test_a_history_free_process_joining_while_another_
    # commits_does_not_flush), which cuts the others off for good
    # (test_a_process_cut_off_by_another_ones_flush_joins_again): this
    # test would then time out waiting for their hits.
    spec = dict(database, sidecar=sidecar.socket, writers=WRITERS, timeout_ms=1000)
    setup_tid = relstorage_worker.setup(spec, WRITERS)
    writers = ["writer%d" % w for w in range(WRITERS)]
    readers = ["reader%d" % r for r in range(READERS)]
    with run_of(spec) as run:
        try:
            first = drive(run, spec, sidecar, writers, readers)
        except Stopped as e:
            first, stopped = None, str(e)
        else:
            stopped = None
        results, failures = run.finish()
        logs = {n: run.log(n, 100000) for n in run.procs}

    histories = {w: results["writer%d" % w]["history"] for w in range(WRITERS) if "writer%d" % w in results}
    truth = LoadBefore(spec) if spec["keep_history"] else None
    try:
        seen = [o for r in results.values() for o in r["seen"]]
        wrong = ["%s: %s" % (n, w) for n, r in sorted(results.items())
                 for w in wrong_observations(r["seen"], histories, setup_tid, truth)]
    finally:
        if truth is not None:
            truth.close()
    assert not wrong, "%d wrong observations of %d, e.g.:\n%s\n%s" % (
        len(wrong), len(seen), "\n".join(wrong[:10]), "\n".join(failures))
    assert stopped is None and not failures, "\n".join(
        [stopped or ""] + failures + ["%s: %s" % (n, r["stats"]) for n, r in sorted(results.items())]
        + ["%s's warnings:\n%s" % (n, warnings(log)) for n, log in sorted(logs.items())]
        + [sidecar_log(sidecar)])

    # Every phase was observed, with hits before the kill and after the
    # restart (a cache that is never used must fail this test).
    per_phase = {}
    for phase, _, _, _, _, _, hit in seen:
        obs, hits = per_phase.get(phase, (0, 0))
        per_phase[phase] = (obs + 1, hits + hit)

    assert per_phase[0][1] > 0 and per_phase[2][1] > 0 and per_phase[4][1] > 0, per_phase
    assert per_phase[1][0] > 0, per_phase
    # The late worker hit at once: in its first transaction, which read
    # every object at the horizon.
    assert first["phase"] == 3 and first["hits"] > 0, "%s\n%s\n%s\n%s\n%s" % (
        first, results["late"]["stats"], logs["late"][-4000:], sidecar_log(sidecar),
        "\n".join("%s's warnings:\n%s" % (n, warnings(log)) for n, log in sorted(logs.items())))
    # The readers saw many states of the writers' objects (the views move).
    assert len({(o[1]) for o in seen}) > 20
    # The writers committed through every phase (the waits ask for 110).
    commits = {n: len(results[n]["history"]) for n in writers}
    assert all(c >= 110 for c in commits.values()), commits


def warnings(log):
    """The adapter's messages in a worker's output."""
    return "\n".join(line for line in log.splitlines() if "tidecache" in line)


def sidecar_log(sidecar):
    """The tail of the sidecar's log (for failure messages)."""
    sidecar.log.flush()
    with open(sidecar.log.name, errors="replace") as f:
        return "tidecached's log:\n" + f.read()[-6000:]


def drive(run, spec, sidecar, writers, readers):
    """The phases of the run; returns the late worker's first
    transaction's counts."""
    for w, name in enumerate(writers):
        run.start("writer", name, w)
    for r, name in enumerate(readers):
        run.start("reader", name, r)

    def commits(name):
        s = run.status(name)
        return 0 if s is None else s["commits"]

    # Phase 0: the cache serves the readers.
    run.wait("hits before the kill",
             lambda: all(run.count(n, 0, "hits") > 0 for n in readers)
             and all(commits(n) >= 40 for n in writers))
    # Phase 1: the sidecar is killed; the run goes on (misses).
    run.set_phase(1)
    sidecar.kill()
    at_kill = {n: commits(n) for n in writers}
    run.wait("reads and commits while the sidecar is dead",
             lambda: all(run.count(n, 1, "obs") >= 30 for n in readers)
             and all(commits(n) >= at_kill[n] + 20 for n in writers))
    # Phase 2: restarted on its arena file; the cache serves again.
    sidecar.start()
    run.set_phase(2)
    at_restart = {n: commits(n) for n in writers}
    run.wait("hits after the restart",
             lambda: all(run.count(n, 2, "hits") > 0 and run.count(n, 2, "still_hits") > 0
                         for n in readers)
             and all(commits(n) >= at_restart[n] + 20 for n in writers))

    # A worker started late, after many commits: the writers pause so
    # that its first view is the sidecar's horizon, reported by the
    # others. Once the horizon is the last commit, nothing can drop the
    # open revisions any more (a resync past the horizon would: one in
    # place of a report lost to a busy sidecar), so the ``still`` objects
    # that a reader hits in phase 3 stay in the cache for the late worker.
    run.flag("pause", True)
    run.wait("the writers to pause", lambda: all((run.status(n) or {}).get("paused") for n in writers))
    last = max(run.status(n)["last"] for n in writers)
    base = relstorage_worker.open_relstorage(spec)
    key = relstorage_database_key(base)
    base.close()

    def horizon():
        return (sidecar.stats()["databases"].get(key) or {}).get("horizon") or 0

    run.wait("the readers' reports to reach the last commit", lambda: horizon() >= last)
    run.set_phase(3)
    run.wait("the readers to read at the last commit and hit the still objects",
             lambda: all(((run.status(n) or {}).get("view") or 0) >= last
                         and run.count(n, 3, "still_hits") >= 3 for n in readers))
    run.start("reader", "late", 99)
    run.wait("the late worker's first transaction", lambda: (run.status("late") or {}).get("first"))
    first = run.status("late")["first"]
    # Phase 4: everyone goes on, the late worker with the others.
    run.set_phase(4)
    run.flag("pause", False)
    at_late = {n: commits(n) for n in writers}
    run.wait("the late worker to read past new commits",
             lambda: run.count("late", 4, "obs") >= 30
             and all(commits(n) >= at_late[n] + 30 for n in writers))
    return first


@pytest.mark.parametrize("keep_history", [False, True], ids=["history-free", "history-preserving"])
def test_a_process_cut_off_by_another_ones_flush_joins_again(sidecar, keep_history):
    """Two processes (two storages, each its own client) over one database;
    A packs through the wrapper, which flushes the database in the sidecar
    and joins A again. B must join the new history too (with a proof) and
    hit again; until then its loads miss (right, but the cache is lost to
    it)."""
    import transaction

    with tempfile.TemporaryDirectory(prefix="rs-sqlite-") as d:
        spec = {"kind": "sqlite", "data_dir": d, "keep_history": keep_history, "sidecar": sidecar.socket}
        relstorage_worker.setup(spec, 1)
        a_storage, a = relstorage_worker.open_db(spec)
        b_storage, b = relstorage_worker.open_db(spec)
        try:
            def commit(i):
                tm = transaction.TransactionManager()
                conn = a.open(tm)
                conn.root()["w0k0"]["i"] = i
                tm.commit()
                conn.close()

            def read_hits():
                tm = transaction.TransactionManager()
                conn = b.open(tm)
                conn.cacheMinimize()
                before = b_storage._tc_stats.hits
                assert conn.root()["still0"]["i"] == 0
                conn.root()["w0k0"]["i"]
                tm.abort()
                conn.close()
                return b_storage._tc_stats.hits - before

            commit(1)
            read_hits()
            assert read_hits() > 0
            a.pack(time.time() + 1)
            assert a_storage.cache_stats()["flushes"] >= 1
            deadline = time.monotonic() + 5
            i = 1
            while True:
                i += 1
                commit(i)
                read_hits()
                if read_hits() > 0:
                    break
                assert time.monotonic() < deadline, (
                    "B never hit again after A's flush: joined=%s attached=%s %s"
                    % (b_storage._tc_joined, b_storage._tc_client.attached, b_storage.cache_stats()))
                time.sleep(0.02)
            assert b_storage._tc_client.attached
        finally:
            a.close()
            b.close()


def test_a_history_free_process_joining_while_another_commits_does_not_flush(sidecar):
    """A commits (written through: the sidecar's newest open revisions are
    A's) and reports up to its last commit T; two more commits (made
    without tidecache: not reported yet) change every object T changed;
    then B starts. B's database is A's: B should join without flushing.
    Seen in test_no_process_reads_outside_its_view_across_a_sidecar_kill
    with the default 50 ms timeout on a busy machine: a writer joining a
    few hundred ms after the other one flushed it at start-up."""
    import transaction
    import ZODB

    with tempfile.TemporaryDirectory(prefix="rs-sqlite-") as d:
        spec = {"kind": "sqlite", "data_dir": d, "keep_history": False, "sidecar": sidecar.socket}
        relstorage_worker.setup(spec, 1)
        keys = [relstorage_worker.key(0, j) for j in range(relstorage_worker.OBJECTS)]
        plain = ZODB.DB(relstorage_worker.open_relstorage(spec))
        a_storage, a = relstorage_worker.open_db(spec)
        b_storage = None

        def commit(db, i):
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            for k in keys:
                conn.root()[k]["i"] = i
            tm.commit()
            conn.close()

        try:
            for i in range(1, 9):
                commit(a, i)
            with a.transaction() as conn:
                conn.root()  # A's poll reports its last commit
            assert a_storage.cache_stats()["flushes"] == 0
            for i in range(9, 11):
                commit(plain, i)
            b_storage, b = relstorage_worker.open_db(spec)
            assert b_storage.cache_stats()["flushes"] == 0
            assert a_storage._tc_client.attached
        finally:
            a.close()
            if b_storage is not None:
                b.close()
            plain.close()


def test_the_watcher_reads_a_fresh_snapshot_at_every_check(database, sidecar, monkeypatch):
    """The watcher's check that the database still holds the newest tid
    reported reads a new snapshot each time. On PostgreSQL (repeatable
    read) its load connection, never used for a load, was not rolled back
    between checks: the next check read the old snapshot, took the newer
    reports for a database gone back in time, and flushed at every check
    after a commit (seen: a flush storm in the run above)."""
    import ZODB
    from persistent.mapping import PersistentMapping

    import tidecache.relstorage
    from tidecache import TideCacheStorage

    monkeypatch.setattr(tidecache.relstorage, "HISTORY_CHECK_SECONDS", 3600.0)
    db = ZODB.DB(TideCacheStorage(relstorage_worker.open_relstorage(database), socket=sidecar.socket))
    try:
        with db.transaction() as conn:
            conn.root()["x"] = PersistentMapping(v=1)
        assert not db.storage._tc_watch_once()
        for i in range(2, 5):
            with db.transaction() as conn:
                conn.root()["x"]["v"] = i
            with db.transaction() as conn:  # a poll reports the commit
                assert conn.root()["x"]["v"] == i
            assert not db.storage._tc_watch_once()
        assert db.storage.cache_stats()["flushes"] == 0
    finally:
        db.close()
