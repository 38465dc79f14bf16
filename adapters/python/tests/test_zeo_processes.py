"""Several processes over one real ZEO server and one sidecar: a commit in
one process is never hidden from, nor shown early to, a connection in
another (invariant 1, across processes)."""

import bisect
import json
import os
import subprocess
import sys

import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZEO.ClientStorage import ClientStorage
from ZODB.utils import u64

WORKER = os.path.join(os.path.dirname(__file__), "zeo_worker.py")


def test_commits_are_seen_exactly_at_their_tid_in_other_processes(zeo_server, sidecar):
    db = ZODB.DB(ClientStorage(zeo_server.address))
    with db.transaction() as c:
        c.root()["a"] = PersistentMapping(v=0)
        c.root()["b"] = PersistentMapping(v=0)
        c.root()["c"] = PersistentMapping(v="never changes")
    setup_tid = u64(db.lastTransaction())
    db.close()

    def start(role, n):
        return subprocess.Popen([sys.executable, WORKER, role, zeo_server.address, sidecar.socket, str(n)],
                                stdout=subprocess.PIPE, text=True)

    readers = [start("reader", 6) for _ in range(2)]
    writer = start("writer", 150)
    results = [json.loads(p.communicate(timeout=120)[0]) for p in [writer] + readers]
    assert all(p.returncode == 0 for p in [writer] + readers)
    history = [(setup_tid, 0)] + [tuple(h) for h in results[0]["history"]]
    tids = [t for t, _ in history]
    assert tids == sorted(tids)

    observations = 0
    for r in results[1:]:
        for view, a, b in r["seen"]:
            # The value committed by the newest transaction at or before the view.
            expected = history[bisect.bisect_right(tids, view) - 1][1]
            assert a == b, "inconsistent snapshot at view %x: a=%s b=%s" % (view, a, b)
            assert a == expected, "view %x saw %s, expected %s" % (view, a, expected)
            observations += 1
    assert observations > 100
    hits = sum(r["stats"]["hits"] for r in results[1:])
    assert hits > 0, "the readers never hit the sidecar: %s" % [r["stats"] for r in results[1:]]
    # The readers saw commits of the other process while they ran.
    assert len({a for r in results[1:] for _, a, _ in r["seen"]}) > 10


def test_a_zeo_reconnect_is_one_collapsed_report_and_keeps_the_rest_warm(zeo_server, sidecar, tmp_path):
    """While a worker is disconnected from ZEO, two commits happen: doc
    changes at T_a, other at T_b; ``still`` never changes. On reconnect ZEO
    delivers both oids as changed at T_b (its quick verification), then
    calls ``invalidateCache``: the tids are not exact. Reported as exact,
    doc's revision would be closed at T_b instead of T_a, and a connection
    of another process whose view lies in [T_a, T_b) would be served the
    old state. The adapter sends it as a collapsed report (the open
    revisions of doc and other answer no view past the old horizon) rather
    than a resync: every lookup at every view equals loadBefore, and the
    open revision of ``still`` keeps answering (a resync dropped it)."""
    import time

    import ZODB.FileStorage
    from ZODB.utils import p64

    from recovery_checks import assert_no_wrong_hit
    from recovery_checks import history
    from tidecache import TideCacheStorage

    storage = TideCacheStorage(ClientStorage(zeo_server.address, wait_timeout=30), socket=sidecar.socket,
                               timeout_ms=2000)
    db = ZODB.DB(storage, cache_size=0)
    with db.transaction() as c:
        c.root()["doc"] = PersistentMapping(x="before")
        c.root()["other"] = PersistentMapping(x=0)
        c.root()["still"] = PersistentMapping(x="unchanged")
    with db.transaction() as c:
        doc_oid = c.root()["doc"]._p_oid
        still_oid = c.root()["still"]._p_oid

    def read(key="doc"):
        conn = db.open()
        conn.cacheMinimize()
        try:
            return conn.root()[key]["x"]
        finally:
            conn.close()
            storage._tc_client.wait_for_stores()

    for key in ("doc", "other", "still"):
        read(key)
    assert read() == "before"
    assert storage.cache_stats()["hits"] > 0
    assert storage._tc_client.lookup(u64(still_oid), u64(storage.lastTransaction())) is not None

    # The ZEO server goes away; two commits reach the FileStorage directly.
    zeo_server.stop()
    direct = ZODB.DB(ZODB.FileStorage.FileStorage(zeo_server.path))
    with direct.transaction() as c:
        c.root()["doc"]["x"] = "changed at T_a"
    t_a = u64(direct.lastTransaction())
    with direct.transaction() as c:
        c.root()["other"]["x"] = 1
    t_b = u64(direct.lastTransaction())
    direct.close()
    zeo_server.start()
    deadline = time.time() + 30
    while not storage._storage.is_connected() or u64(storage.lastTransaction()) < t_b:
        assert time.time() < deadline, "the ZEO client never caught up"
        time.sleep(0.05)

    base = storage._storage
    client = storage._tc_client
    for view in (t_a - 1, t_a, t_b - 1, t_b):
        hit = client.lookup(u64(doc_oid), view)
        if hit is not None:
            data, serial, _ = base.loadBefore(doc_oid, p64(view + 1))
            assert (hit[0], hit[1]) == (u64(serial), data), "wrong hit at view %x" % view
    assert_no_wrong_hit(client, base.loadBefore, history(base))
    assert read() == "changed at T_a"
    # still's open revision answers past the gap: it was not dropped.
    assert client.lookup(u64(still_oid), t_b) is not None
    stats = storage.cache_stats()
    assert stats["reconnects_collapsed"] == 1, stats
    assert stats["resyncs"] == 0, stats
    hits = storage.cache_stats(wait=True)["hits"]
    assert read("still") == "unchanged"
    assert storage.cache_stats()["hits"] > hits
    # Later commits are reported as usual.
    with db.transaction() as c:
        c.root()["doc"]["x"] = "after"
    assert read() == "after"
    assert read("other") == 1
    assert_no_wrong_hit(client, base.loadBefore, history(base))
    db.close()


def test_a_zeo_reconnect_with_a_cache_too_old_resyncs(zeo_servers, sidecar):
    """The server's invalidation queue (here 1 transaction) does not reach
    back to the client's cache: ZEO clears its cache and calls
    ``invalidateCache`` ("cache too old"): the adapter resyncs; no view
    is served a revision the storage does not have there."""
    import time

    import ZODB.FileStorage

    from recovery_checks import assert_no_wrong_hit
    from recovery_checks import history
    from tidecache import TideCacheStorage

    zeo = zeo_servers({"invalidation-queue-size": 1})
    storage = TideCacheStorage(ClientStorage(zeo.address, wait_timeout=30), socket=sidecar.socket,
                               timeout_ms=2000)
    db = ZODB.DB(storage, cache_size=0)
    with db.transaction() as c:
        for k in "abc":
            c.root()[k] = PersistentMapping(x=0)

    def read(key):
        conn = db.open()
        conn.cacheMinimize()
        try:
            return conn.root()[key]["x"]
        finally:
            conn.close()
            storage._tc_client.wait_for_stores()

    for k in "abc":
        read(k)
    zeo.stop()
    direct = ZODB.DB(ZODB.FileStorage.FileStorage(zeo.path))
    for i in range(4):
        with direct.transaction() as c:
            c.root()["ab"[i % 2]]["x"] = i + 1
    last = u64(direct.lastTransaction())
    direct.close()
    zeo.start()
    deadline = time.time() + 30
    while not storage._storage.is_connected() or u64(storage.lastTransaction()) < last:
        assert time.time() < deadline, "the ZEO client never caught up"
        time.sleep(0.05)
    # The resync goes out with the next report.
    with db.transaction() as c:
        c.root()["c"]["x"] = "next"
    stats = storage.cache_stats()
    assert stats["resyncs"] >= 1 and stats["reconnects_collapsed"] == 0, stats
    base = storage._storage
    assert_no_wrong_hit(storage._tc_client, base.loadBefore, history(base))
    assert [read(k) for k in "abc"] == [3, 4, "next"]
    db.close()
