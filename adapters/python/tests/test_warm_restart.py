"""The sidecar's horizon behind the storage at attach: a sidecar killed
with ``kill -9`` and restarted on the same arena file, or commits made
while no tidecache client was attached (an admin script). The first
adapter to attach tells the sidecar what changed (``_tc_recover``), in the
background and bounded, so current revisions answer again and those
changed meanwhile never do: exact reports from a FileStorage's iterator,
one collapsed report for the rest of a large backlog, a resync when
nothing can say what changed. The ZEO cases are in test_recovery_zeo.py."""

import logging
import threading
import time

import ZODB
import ZODB.FileStorage
from persistent.mapping import PersistentMapping
from ZODB.utils import u64

import recovery_checks
import tidecache.storage
from recovery_checks import assert_no_wrong_hit
from recovery_checks import history
from recovery_checks import recoveries
from recovery_checks import tidecache_threads
from recovery_checks import wait_recovered
from test_storage import make_db, read_fresh

KEYS = "abcdef"

#: A generous bound on each sidecar call: on a loaded machine the default
#: 50 ms makes an attach fail now and then (the test would then check a
#: storage that runs from its base, not a recovery).
TIMEOUT_MS = 2000


def populate_and_cache(tmp_path, sidecar):
    storage, db = make_db(tmp_path, sidecar.socket, timeout_ms=TIMEOUT_MS)
    with db.transaction() as c:
        for k in KEYS:
            c.root()[k] = PersistentMapping(x=0)
    for k in KEYS:
        assert read_fresh(db, k) == 0
    assert storage.cache_stats(wait=True)["sidecar"]["entries"] >= len(KEYS)
    db.close()


def commit_behind_the_sidecars_back(tmp_path):
    plain = ZODB.DB(ZODB.FileStorage.FileStorage(str(tmp_path / "Data.fs")))
    for k in "bd":
        with plain.transaction() as c:
            c.root()[k]["x"] = 1
    plain.close()


def wait_caught_up(storage):
    wait_recovered(storage)
    last = u64(storage.lastTransaction())
    deadline = time.time() + 10
    while True:
        db = storage._tc_client.stats()["databases"][storage._tc_client.database]
        # The horizon reaches ``last`` with the catch-up's last report; its
        # log line follows, and the held reports are sent after it: wait
        # for the thread to be done too (``_tc_held`` is None).
        if db["horizon"] == last and storage._tc_held is None:
            return
        assert time.time() < deadline, "the sidecar never caught up: %s" % db
        time.sleep(0.02)


def test_the_first_adapter_catches_a_restarted_sidecar_up(tmp_path, sidecar, caplog):
    populate_and_cache(tmp_path, sidecar)
    sidecar.kill()
    commit_behind_the_sidecars_back(tmp_path)
    sidecar.start()
    caplog.set_level(logging.INFO, logger="tidecache")
    storage, db = make_db(tmp_path, sidecar.socket, timeout_ms=TIMEOUT_MS)
    wait_caught_up(storage)
    assert "by exact" in caplog.text
    assert recoveries(storage) == {"exact": 1, "collapsed": 0, "resync": 0}
    assert_no_wrong_hit(storage._tc_client, storage._storage.loadBefore, history(storage._storage))
    hits = storage.cache_stats(wait=True)["hits"]
    for k in KEYS:
        assert read_fresh(db, k) == (1 if k in "bd" else 0), k
    # The root and the four unchanged mappings came from the re-attached
    # arena; the two changed ones were closed by the catch-up and loaded.
    assert storage.cache_stats()["hits"] - hits >= 5, storage.cache_stats()
    assert storage.cache_stats()["resyncs"] == 0
    # Later commits are reported as usual.
    with db.transaction() as c:
        c.root()["a"]["x"] = 2
    assert read_fresh(db, "a") == 2
    assert read_fresh(db, "c") == 0
    db.close()


def test_without_an_iterator_the_open_revisions_are_dropped(tmp_path, sidecar, caplog, monkeypatch):
    populate_and_cache(tmp_path, sidecar)
    sidecar.kill()
    commit_behind_the_sidecars_back(tmp_path)
    sidecar.start()

    original = ZODB.FileStorage.FileStorage.iterator

    def no_iterator(self, start=None, stop=None):
        # The proof's one step (start == stop) still works: without it the
        # proof would rest on the sidecar's open sample, empty until its
        # background verification is done, and flush now and then.
        if start is not None and start == stop:
            return original(self, start, stop)
        raise NotImplementedError("this storage cannot iterate")

    monkeypatch.setattr(ZODB.FileStorage.FileStorage, "iterator", no_iterator)
    caplog.set_level(logging.INFO, logger="tidecache")
    storage, db = make_db(tmp_path, sidecar.socket, timeout_ms=TIMEOUT_MS)
    wait_caught_up(storage)
    assert "cannot iterate" in caplog.text and "resyncing" in caplog.text
    assert storage.cache_stats()["resyncs"] == 1
    assert recoveries(storage) == {"exact": 0, "collapsed": 0, "resync": 1}
    for k in KEYS:
        assert read_fresh(db, k) == (1 if k in "bd" else 0), k
    db.close()


def test_a_catch_up_over_a_range_another_process_packed_resyncs(tmp_path, sidecar, caplog):
    """FileStorage's iterator after a pack by another process: transactions
    before the pack time lose their superseded records (those left with none
    disappear, the others carry status "p"), so the range is no longer
    every change with its exact tid. The catch-up must resync rather than
    report it as exact: an open revision changed in a vanished transaction
    would otherwise be closed too late, and served at views where the
    storage has nothing."""
    from ZODB.utils import p64

    storage, db = make_db(tmp_path, sidecar.socket, timeout_ms=TIMEOUT_MS)
    with db.transaction() as c:
        c.root()["x"] = PersistentMapping(x=0)
    with db.transaction() as c:
        x_oid = c.root()["x"]._p_oid
        for k in "klmno":
            c.root()[k] = PersistentMapping(x=0)
    for k in "xklmno":
        assert read_fresh(db, k) == 0
    db.close()
    # Another process changes x twice, then packs: the first change's
    # transaction vanishes, the second's is marked packed.
    plain = ZODB.DB(ZODB.FileStorage.FileStorage(str(tmp_path / "Data.fs")))
    tids = []
    for v in (1, 2):
        with plain.transaction() as c:
            c.root()["x"]["x"] = v
        tids.append(u64(plain.storage.lastTransaction()))
    plain.pack(time.time() + 1)
    plain.close()
    caplog.set_level(logging.INFO, logger="tidecache")
    storage, db = make_db(tmp_path, sidecar.socket, timeout_ms=TIMEOUT_MS)
    wait_caught_up(storage)
    assert storage.cache_stats()["flushes"] == 0, "joined by a proof, not flushed"
    # At the vanished transaction's tid the storage has no revision of x:
    # neither may the sidecar.
    assert storage._storage.loadBefore(x_oid, p64(tids[0] + 1)) is None
    assert storage._tc_client.lookup(u64(x_oid), tids[0]) is None
    assert "was packed" in caplog.text
    assert recoveries(storage)["resync"] == 1
    assert read_fresh(db, "x") == 2
    db.close()


# -- commits made while no tidecache client was attached --------------------


def commit_many_behind(tmp_path, n, keys="bd"):
    """``n`` transactions by a plain FileStorage (no tidecache), each
    changing one of ``keys`` in turn."""
    plain = ZODB.DB(ZODB.FileStorage.FileStorage(str(tmp_path / "Data.fs")))
    for i in range(n):
        with plain.transaction() as c:
            c.root()[keys[i % len(keys)]]["x"] = i + 1
    plain.close()


def expected(tmp_path):
    plain = ZODB.DB(ZODB.FileStorage.FileStorage(str(tmp_path / "Data.fs"), read_only=True))
    with plain.transaction() as c:
        out = {k: c.root()[k]["x"] for k in KEYS}
    plain.close()
    return out


def check_recovered(storage, db, tmp_path, unchanged):
    """``recovery_checks.check_recovered`` against the FileStorage's
    current values."""
    recovery_checks.check_recovered(storage, db, KEYS, expected(tmp_path), unchanged)


class SteppingClock:
    """``time`` for tidecache.storage whose ``monotonic`` moves 10 ms a
    call: the recovery's time bounds fall at a fixed transaction, whatever
    the machine's speed."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        self.now += 0.01
        return self.now

    def sleep(self, seconds):
        time.sleep(seconds)

    def time(self):
        return time.time()


def test_a_small_backlog_is_reported_exactly(tmp_path, sidecar, caplog):
    populate_and_cache(tmp_path, sidecar)
    commit_many_behind(tmp_path, 5)
    caplog.set_level(logging.INFO, logger="tidecache")
    storage, db = make_db(tmp_path, sidecar.socket, timeout_ms=TIMEOUT_MS)
    wait_recovered(storage)
    assert recoveries(storage) == {"exact": 1, "collapsed": 0, "resync": 0}
    assert "by exact (5 transactions)" in caplog.text
    check_recovered(storage, db, tmp_path, unchanged="acef")
    assert storage.cache_stats()["resyncs"] == 0
    db.close()


def test_a_large_backlog_is_reported_exactly_then_collapsed(tmp_path, sidecar, caplog, monkeypatch):
    """Past ``RECOVERY_EXACT_SECONDS`` (here: after a few transactions, by a
    clock that moves a fixed step a reading) the rest of the backlog is
    one collapsed report: every changed oid with its newest tid."""
    populate_and_cache(tmp_path, sidecar)
    commit_many_behind(tmp_path, 120)
    monkeypatch.setattr(tidecache.storage, "time", SteppingClock())
    monkeypatch.setattr(tidecache.storage, "RECOVERY_EXACT_SECONDS", 0.1)
    monkeypatch.setattr(tidecache.storage, "RECOVERY_SECONDS", 1000.0)
    monkeypatch.setattr(tidecache.storage, "RECOVERY_CHUNK_RECORDS", 3)
    caplog.set_level(logging.INFO, logger="tidecache")
    storage, db = make_db(tmp_path, sidecar.socket, timeout_ms=TIMEOUT_MS)
    wait_recovered(storage)
    assert recoveries(storage) == {"exact": 0, "collapsed": 1, "resync": 0}, caplog.text
    assert "120 transactions, " in caplog.text and " exact, 2 oids changed in the rest" in caplog.text
    assert " 0 exact," not in caplog.text, "some transactions were reported exactly first"
    check_recovered(storage, db, tmp_path, unchanged="acef")
    assert storage.cache_stats()["resyncs"] == 0
    # Later commits are reported as usual.
    with db.transaction() as c:
        c.root()["a"]["x"] = "later"
    assert read_fresh(db, "a") == "later"
    check_recovered(storage, db, tmp_path, unchanged="cef")
    db.close()


def test_a_backlog_past_the_bound_resyncs_and_warns(tmp_path, sidecar, caplog, monkeypatch):
    populate_and_cache(tmp_path, sidecar)
    commit_many_behind(tmp_path, 20)
    monkeypatch.setattr(tidecache.storage, "RECOVERY_EXACT_SECONDS", -1.0)
    monkeypatch.setattr(tidecache.storage, "RECOVERY_SECONDS", -1.0)
    caplog.set_level(logging.INFO, logger="tidecache")
    storage, db = make_db(tmp_path, sidecar.socket, timeout_ms=TIMEOUT_MS)
    wait_recovered(storage)
    assert recoveries(storage) == {"exact": 0, "collapsed": 0, "resync": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "resyncing" in w]) == 1, caplog.text
    # A loaded machine may time a call out (2 s): its fallback is logged
    # too, and is no defect; any other warning is.
    assert all("resyncing" in w or "fall back to the base storage" in w or "sidecar unavailable" in w
               for w in warnings), caplog.text
    assert u64(storage.lastTransaction()) == storage._tc_client.stats()["databases"][
        storage._tc_client.database]["horizon"]
    base = storage._storage
    assert_no_wrong_hit(storage._tc_client, base.loadBefore, history(base))
    want = expected(tmp_path)
    for k in KEYS:
        assert read_fresh(db, k) == want[k], k
    db.close()


def blocking_iterator(monkeypatch, pause, at=1):
    """FileStorage's iterator, which calls ``pause()`` before it yields the
    transaction ``at`` (0: the first) of a recovery's range (an iterator
    over everything, as the checks use, never pauses)."""
    original = ZODB.FileStorage.FileStorage.iterator

    def iterator(self, start=None, stop=None):
        it = original(self, start, stop)

        def gen():
            try:
                for i, txn in enumerate(it):
                    if i == at and start is not None:
                        pause()
                    yield txn
            finally:
                it.close()

        return gen()

    monkeypatch.setattr(ZODB.FileStorage.FileStorage, "iterator", iterator)


def check_after_close(tmp_path, sidecar):
    """A new process's view: the sidecar's horizon is already the storage's
    tid (the closed storage's recovery or resync reached it: this one has
    nothing to recover), and nothing it serves is wrong."""
    from tidecache import TideCacheStorage

    fs = ZODB.FileStorage.FileStorage(str(tmp_path / "Data.fs"), read_only=True)
    storage = TideCacheStorage(fs, socket=sidecar.socket, timeout_ms=TIMEOUT_MS)
    try:
        assert storage._tc_joined
        assert storage._tc_client.horizon == u64(fs.lastTransaction()), "the sidecar was left behind"
        assert_no_wrong_hit(storage._tc_client, fs.loadBefore, history(fs))
    finally:
        storage.close()


def test_a_storage_closed_during_its_recovery_resyncs_and_leaves_no_thread(tmp_path, sidecar, caplog,
                                                                          monkeypatch):
    """``close`` right after open, with a large backlog: the recovery (here
    paused inside the iterator until ``close`` begins) resyncs at once
    rather than read on, and ``close`` returns after it: no thread is
    left, and the sidecar got the resync (its horizon is the storage's)."""
    populate_and_cache(tmp_path, sidecar)
    commit_many_behind(tmp_path, 200)
    made, holder, closed, outlived = threading.Event(), [], threading.Event(), []

    def pause():
        assert made.wait(20)
        assert holder[0]._tc_closing.wait(20)
        # close() must wait for this thread: if it returned, ``closed`` is
        # set at once; if it waits, this bound passes with ``closed`` unset.
        outlived.append(closed.wait(1.0))

    # Before the first transaction: the recovery thread is there before
    # close begins, whenever it is scheduled.
    blocking_iterator(monkeypatch, pause, at=0)
    caplog.set_level(logging.INFO, logger="tidecache")
    storage, db = make_db(tmp_path, sidecar.socket, timeout_ms=TIMEOUT_MS)
    holder.append(storage)
    made.set()
    db.close()
    closed.set()
    assert outlived == [False], "close returned before the recovery ended"
    assert tidecache_threads() == []
    assert storage._tc_held is None
    assert recoveries(storage) == {"exact": 0, "collapsed": 0, "resync": 1}, caplog.text
    assert "the storage is closing" in caplog.text
    monkeypatch.undo()
    check_after_close(tmp_path, sidecar)


def test_a_storage_closed_right_after_open_hands_the_recovery_over(tmp_path, sidecar):
    """Whatever the recovery had reached when ``close`` came: after it, no
    thread, the sidecar at the storage's tid (by the recovery or by a
    resync, never neither), and no wrong hit."""
    populate_and_cache(tmp_path, sidecar)
    commit_many_behind(tmp_path, 300)
    storage, db = make_db(tmp_path, sidecar.socket, timeout_ms=TIMEOUT_MS)
    db.close()
    assert tidecache_threads() == []
    check_after_close(tmp_path, sidecar)
    assert sum(recoveries(storage).values()) == 1


def test_a_sidecar_killed_during_the_recovery_costs_only_misses(tmp_path, sidecar, monkeypatch):
    """The sidecar dies after the recovery's first chunk: the rest is
    lost, the storage runs from its base and attaches again to the
    restarted sidecar; no view is ever served a wrong revision."""
    populate_and_cache(tmp_path, sidecar)
    commit_many_behind(tmp_path, 50)
    monkeypatch.setattr(tidecache.storage, "RECOVERY_CHUNK_RECORDS", 2)
    blocking_iterator(monkeypatch, sidecar.kill)
    storage, db = make_db(tmp_path, sidecar.socket, timeout_ms=TIMEOUT_MS)
    wait_recovered(storage)
    assert sidecar.proc.poll() is not None, "the sidecar was killed"
    want = expected(tmp_path)
    for k in KEYS:
        assert read_fresh(db, k) == want[k], k
    monkeypatch.undo()
    sidecar.start()
    deadline = time.time() + 20
    while True:
        for k in KEYS:
            assert read_fresh(db, k) == want[k], k
        if storage.cache_stats()["hits"] > 0 and storage._tc_joined:
            break
        assert time.time() < deadline, storage.cache_stats()
        time.sleep(0.05)
    base = storage._storage
    assert_no_wrong_hit(storage._tc_client, base.loadBefore, history(base))
    db.close()
    assert tidecache_threads() == []


def test_a_commit_during_the_recovery_is_written_through_after_it(tmp_path, sidecar, monkeypatch):
    """A commit made while the recovery runs (its report is held until the
    recovery's reports are queued) keeps its write-through: the stores are
    held beside the report and queued after it. Sent before it, they would
    be past the sidecar's horizon and dropped, and the read after the
    write would miss (it did, before the stores were held)."""
    populate_and_cache(tmp_path, sidecar)
    commit_many_behind(tmp_path, 20)
    committed = threading.Event()

    def pause():
        assert committed.wait(20), "the test never committed"

    blocking_iterator(monkeypatch, pause, at=0)
    storage, db = make_db(tmp_path, sidecar.socket, timeout_ms=TIMEOUT_MS)
    try:
        with db.transaction() as c:
            c.root()["a"]["x"] = 99
        assert storage._tc_held is not None, "the recovery was not running during the commit"
        committed.set()
        wait_recovered(storage)
        storage._tc_client.wait_for_stores()
        before = storage.cache_stats()
        assert read_fresh(db, "a") == 99
        after = storage.cache_stats()
        assert after["misses"] == before["misses"], "the commit's states were not written through"
        monkeypatch.undo()
        assert_no_wrong_hit(storage._tc_client, storage._storage.loadBefore, history(storage._storage))
    finally:
        committed.set()
        db.close()
