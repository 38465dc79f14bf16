"""Hostile-review findings: each test is a minimal repro of a defect found
by the review of the attach proof, flush and key rules, kept as a
regression test now that each is fixed."""

import os
import shutil
import time

import pytest
import transaction
import ZODB
import ZODB.FileStorage
from persistent.mapping import PersistentMapping

import tidecache.storage
from tidecache import Client
from tidecache import TideCacheStorage


def open_db(path, socket):
    # 2 s per sidecar call: the 50 ms default made an attach fail now and
    # then on a loaded machine, and the test then checked a storage that
    # never joined (a timing-dependent test).
    storage = TideCacheStorage(ZODB.FileStorage.FileStorage(str(path)), socket=socket, timeout_ms=2000)
    return storage, ZODB.DB(storage, cache_size=0)


def commit(db, value):
    with db.transaction() as c:
        c.root()["doc"]["x"] = value


def read_fresh(db):
    conn = db.open()
    try:
        conn.cacheMinimize()
        return conn.root()["doc"]["x"]
    finally:
        conn.close()
        db.storage._tc_client.wait_for_stores()



def test_a_flush_does_not_cut_off_a_process_still_on_the_old_file(tmp_path, sidecar, monkeypatch):
    """A backup restored at the path (Data.fs and its .lock/.index moved
    away, the backup copied in) while a process of the old file still runs
    (a worker the operator forgot): both storages are ``file:<path>``. The
    new one is behind, waits, flushes and starts the log; the old process
    is never told, stays joined, and keeps looking up, reporting and
    storing in a database that now holds another history. Here the new
    process's revision of ``doc`` (closed at its own commit) answers the
    old process's view, where its history has another state."""
    monkeypatch.setattr(tidecache.storage, "RESTORE_GRACE_SECONDS", 0.2)
    path = tmp_path / "Data.fs"
    plain = ZODB.DB(ZODB.FileStorage.FileStorage(str(path)))
    with plain.transaction() as c:
        c.root()["doc"] = PersistentMapping(x="base")  # T1
    plain.close()
    shutil.copy(path, tmp_path / "backup.fs")

    a, db_a = open_db(path, sidecar.socket)
    commit(db_a, "A1")  # T2, in the old history only
    assert read_fresh(db_a) == "A1"

    # The operator restores the backup at the path; A keeps its open file.
    for suffix in ("", ".index", ".tmp", ".lock"):
        p = tmp_path / ("Data.fs" + suffix)
        if p.exists():
            os.rename(p, tmp_path / ("old.fs" + suffix))
    shutil.copy(tmp_path / "backup.fs", path)
    b, db_b = open_db(path, sidecar.socket)
    assert b.cache_stats()["flushes"] == 1
    commit(db_b, "B1")  # T3, in the new history only: closes (doc, T1) at T3
    b._tc_client.wait_for_stores()
    assert a._tc_client.database == b._tc_client.database
    # A at its view T2 must read A1: loadBefore(doc, T2 + 1) of its storage.
    assert read_fresh(db_a) == "A1"
    db_a.close()
    db_b.close()


def test_an_open_store_past_the_horizon_survives_a_proof_of_the_horizon(sidecar):
    """The adapter of process A commits 20 (changing oid 1) and its report
    is lost (the sidecar answered too slowly: ``Unavailable``, the next
    report would be a resync); A's connection at view 20 loads oid 1 and
    the store queue stores ``(1, 20)`` open, which the sidecar keeps: the
    log has no change of oid 1 in ``(20, horizon]``, an empty range. A
    stops; a backup holding the history up to the horizon 10 is restored
    and committed to (30, oid 2 only). Its proof of the horizon holds (its
    iterator has 10; the open sample only asks about serials <= 10), it
    joins, catches up ``(10, 30]``, and is served oid 1 at serial 20, a
    transaction its history does not have."""
    a = Client(sidecar.socket, database="db")
    assert a.attach(10) == "started"
    # Refused (PastHorizon): no report told of 20 yet.
    assert not a.store(1, 20, None, b"A's history", 20)
    assert not a.store(1, 20, 25, b"A's history", 30)
    a.close()
    b = Client(sidecar.socket, database="db")
    assert b.attach(30) == "prove"
    assert b.proof == (10, [], [])  # B's iterator has 10: proved
    assert b.attach(30, 10) == "joined"
    b.report(10, 30, [(2, 30)])
    assert b.wait_for_stores(5000) and b.horizon == 30
    hit = b.lookup(1, 30)
    assert hit is None or hit[0] <= 10, hit
    b.close()
