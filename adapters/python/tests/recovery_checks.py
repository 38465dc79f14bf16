"""Checks shared by the recovery tests (test_warm_restart.py,
test_recovery_zeo.py): every revision the sidecar serves equals the base
storage's ``loadBefore``, and the open revisions of oids a backlog did not
change still answer."""

import threading
import time

from ZODB.utils import p64
from ZODB.utils import u64

from test_storage import read_fresh


def history(storage):
    """``[(tid, [oid, ...]), ...]`` of every transaction of ``storage`` (a
    FileStorage, or a ZEO ClientStorage), from its iterator."""
    out = []
    it = storage.iterator()
    try:
        for txn in it:
            out.append((u64(txn.tid), [u64(r.oid) for r in txn]))
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return out


def assert_no_wrong_hit(client, load_before, txns):
    """Every lookup by ``client`` of every oid of ``txns`` at every view
    around every tid equals ``load_before(oid, view + 1)``; returns the
    number of hits checked."""
    oids = sorted({o for _, os in txns for o in os})
    views = sorted({v for t, _ in txns for v in (t - 1, t)})
    hits = 0
    for view in views:
        for oid in oids:
            hit = client.lookup(oid, view)
            if hit is None:
                continue
            r = load_before(p64(oid), p64(view + 1))
            assert r is not None, "hit for oid %d at view %x where the storage has nothing" % (oid, view)
            data, serial, _ = r
            assert (hit[0], hit[1]) == (u64(serial), data), "wrong hit: oid %d at view %x" % (oid, view)
            hits += 1
    return hits


def wait_recovered(storage, timeout=20):
    """Waits (bounded) until the storage's recovery thread is done and its
    held reports are sent."""
    worker = storage._tc_worker
    if worker is not None:
        worker.join(timeout)
        assert not worker.is_alive(), "the recovery never ended"
    deadline = time.time() + timeout
    while storage._tc_held is not None:
        assert time.time() < deadline, "the held reports were never sent"
        time.sleep(0.01)


def tidecache_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("tidecache-") and t.is_alive()]


def recoveries(storage):
    s = storage.cache_stats()
    return {k: s["recoveries_" + k] for k in ("exact", "collapsed", "resync")}


def check_recovered(storage, db, keys, want, unchanged):
    """No wrong hit at any view of the history; the open revisions of the
    ``unchanged`` keys still answer at the newest view; every one of
    ``keys`` reads its current value, ``want[key]``."""
    base = storage._storage
    assert_no_wrong_hit(storage._tc_client, base.loadBefore, history(base))
    last = u64(base.lastTransaction())
    conn = db.open()
    oids = {k: u64(conn.root()[k]._p_oid) for k in keys}
    conn.close()
    for k in unchanged:
        assert storage._tc_client.lookup(oids[k], last) is not None, "%s's open revision was dropped" % k
    for k in keys:
        assert read_fresh(db, k) == want[k], k
