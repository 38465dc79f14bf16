"""The sidecar's horizon behind a ZEO database at attach (commits made
while no tidecache client was connected: a plain ZEO client, an admin
script): the adapter asks the ZEO server which oids changed since the
horizon (``getInvalidations``: its invalidation queue, or its storage's
iterator when ``invalidation-age`` covers the gap), one round trip, and
sends one collapsed report; the open revisions of every other oid keep
answering. Beyond the server's reach it resyncs, once warned. Each case
checks every hit against ZEO's ``loadBefore``."""

import logging

import ZODB
from persistent.mapping import PersistentMapping
from ZEO.ClientStorage import ClientStorage

from recovery_checks import check_recovered
from recovery_checks import recoveries
from recovery_checks import tidecache_threads
from recovery_checks import wait_recovered
from test_storage import read_fresh
from tidecache import TideCacheStorage

KEYS = "abcdef"


def open_db(zeo, sidecar):
    # A generous bound on each sidecar call (a loaded machine).
    storage = TideCacheStorage(ClientStorage(zeo.address, wait_timeout=30), socket=sidecar.socket,
                               timeout_ms=2000)
    return storage, ZODB.DB(storage, cache_size=0)


def populate_and_cache(zeo, sidecar):
    storage, db = open_db(zeo, sidecar)
    with db.transaction() as c:
        for k in KEYS:
            c.root()[k] = PersistentMapping(x=0)
    for k in KEYS:
        assert read_fresh(db, k) == 0
    db.close()


def commit_behind(zeo, n, keys="bd"):
    """``n`` commits by a plain ZEO client (no tidecache)."""
    plain = ZODB.DB(ClientStorage(zeo.address, wait_timeout=30))
    for i in range(n):
        with plain.transaction() as c:
            c.root()[keys[i % len(keys)]]["x"] = i + 1
    with plain.transaction() as c:
        want = {k: c.root()[k]["x"] for k in KEYS}
    plain.close()
    return want


def check(storage, db, want, unchanged):
    check_recovered(storage, db, KEYS, want, unchanged)


def test_a_backlog_within_the_servers_invalidation_queue_is_one_collapsed_report(zeo_servers, sidecar,
                                                                                 caplog):
    zeo = zeo_servers()
    populate_and_cache(zeo, sidecar)
    want = commit_behind(zeo, 20)
    caplog.set_level(logging.INFO, logger="tidecache")
    storage, db = open_db(zeo, sidecar)
    wait_recovered(storage)
    assert recoveries(storage) == {"exact": 0, "collapsed": 1, "resync": 0}, caplog.text
    assert "the ZEO server's invalidations: 2 oids" in caplog.text
    check(storage, db, want, unchanged="acef")
    assert storage.cache_stats()["resyncs"] == 0
    with db.transaction() as c:
        c.root()["a"]["x"] = "later"
    want["a"] = "later"
    check(storage, db, want, unchanged="cef")
    db.close()
    assert tidecache_threads() == []


def test_a_backlog_beyond_the_servers_reach_resyncs_and_warns(zeo_servers, sidecar, caplog):
    zeo = zeo_servers({"invalidation-queue-size": 2})
    populate_and_cache(zeo, sidecar)
    want = commit_behind(zeo, 10)
    caplog.set_level(logging.INFO, logger="tidecache")
    storage, db = open_db(zeo, sidecar)
    wait_recovered(storage)
    assert recoveries(storage) == {"exact": 0, "collapsed": 0, "resync": 1}, caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "invalidation-age" in warnings[0], caplog.text
    check(storage, db, want, unchanged="")
    db.close()


def test_a_backlog_within_the_servers_invalidation_age_is_one_collapsed_report(zeo_servers, sidecar,
                                                                               caplog):
    zeo = zeo_servers({"invalidation-queue-size": 2, "invalidation-age": 3600})
    populate_and_cache(zeo, sidecar)
    want = commit_behind(zeo, 10)
    caplog.set_level(logging.INFO, logger="tidecache")
    storage, db = open_db(zeo, sidecar)
    wait_recovered(storage)
    assert recoveries(storage) == {"exact": 0, "collapsed": 1, "resync": 0}, caplog.text
    check(storage, db, want, unchanged="acef")
    db.close()


def test_a_zeo_storage_closed_during_its_recovery_leaves_no_thread(zeo_servers, sidecar):
    zeo = zeo_servers()
    populate_and_cache(zeo, sidecar)
    want = commit_behind(zeo, 20)
    storage, db = open_db(zeo, sidecar)
    db.close()
    assert tidecache_threads() == []
    assert sum(recoveries(storage).values()) == 1
    # A new process: nothing left to recover, nothing wrong served.
    storage, db = open_db(zeo, sidecar)
    assert sum(recoveries(storage).values()) == 0, "the sidecar was left behind"
    check(storage, db, want, unchanged="")
    db.close()
