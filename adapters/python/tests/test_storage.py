"""TideCacheStorage with a running sidecar: MVCC visibility, faults,
views, pack, ZConfig, and the raw Client."""

import os
import time

import pytest
import transaction
import ZODB
import ZODB.config
import ZODB.FileStorage
import ZODB.MappingStorage
from persistent.mapping import PersistentMapping
from ZODB.utils import p64
from ZODB.utils import u64

import tidecache
from tidecache import Client
from tidecache import TideCacheStorage


def make_db(tmp_path, socket, **kw):
    base = ZODB.FileStorage.FileStorage(str(tmp_path / "Data.fs"))
    storage = TideCacheStorage(base, socket=socket, **kw)
    # cache_size=0: every access after cacheMinimize goes to the storage.
    return storage, ZODB.DB(storage, cache_size=0)


def read_fresh(db, key="doc"):
    """Reads through the storage (empty object cache), then waits until the
    stores that read queued have reached the sidecar: stores are sent in the
    background, and the next read should find them."""
    conn = db.open()
    try:
        conn.cacheMinimize()
        return conn.root()[key]["x"]
    finally:
        conn.close()
        db.storage._tc_client.wait_for_stores()


def test_connections_share_states_and_see_their_own_snapshot(tmp_path, sidecar):
    storage, db = make_db(tmp_path, sidecar.socket)
    with db.transaction() as c:
        c.root()["doc"] = PersistentMapping(x=1)
    for _ in range(3):
        assert read_fresh(db) == 1
    stats = storage.cache_stats(wait=True)
    assert stats["hits"] >= 2, stats
    assert stats["sidecar"]["entries"] >= 2

    tm_old, tm_new = transaction.TransactionManager(), transaction.TransactionManager()
    old = db.open(tm_old)
    assert old.root()["doc"]["x"] == 1  # old's view is before the commit
    with db.transaction() as c:
        c.root()["doc"]["x"] = 2
    old.cacheMinimize()
    assert old.root()["doc"]["x"] == 1, "a commit after the view must stay hidden"
    new = db.open(tm_new)
    new.cacheMinimize()
    assert new.root()["doc"]["x"] == 2, "a commit before the view must be seen"
    tm_old.abort()
    old.cacheMinimize()
    assert old.root()["doc"]["x"] == 2
    old.close()
    new.close()
    db.close()


def test_a_connection_changes_its_own_copy_never_the_shared_state(tmp_path, sidecar):
    """Invariant 6: two connections read one cached revision; a change in
    one (uncommitted, then committed) reaches the other only as a new
    revision, at its next transaction."""
    storage, db = make_db(tmp_path, sidecar.socket)
    with db.transaction() as c:
        c.root()["doc"] = PersistentMapping(x=1, items=[1, 2])
    read_fresh(db)
    tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
    c1, c2 = db.open(tm1), db.open(tm2)
    c1.cacheMinimize()
    c2.cacheMinimize()
    hits = storage.cache_stats(wait=True)["hits"]
    d1, d2 = c1.root()["doc"], c2.root()["doc"]
    assert d1["items"] == d2["items"] == [1, 2]
    assert storage.cache_stats()["hits"] > hits, "both read the cached revision"
    assert d1 is not d2 and d1["items"] is not d2["items"]
    d1["items"].append(3)  # mutates connection 1's own copy, in place
    d1["x"] = 2
    assert d2["items"] == [1, 2] and d2["x"] == 1
    tm1.commit()
    assert c2.root()["doc"]["x"] == 1, "c2's snapshot predates the commit"
    tm2.abort()
    c2.cacheMinimize()
    assert c2.root()["doc"]["x"] == 2
    c1.close()
    c2.close()
    db.close()


def test_views_are_released_when_connections_go_back_to_the_pool(tmp_path, sidecar):
    storage, db = make_db(tmp_path, sidecar.socket)
    conns = [db.open(transaction.TransactionManager()) for _ in range(3)]
    for c in conns:
        c.root()
    # The views are kept in the process: the sidecar holds one, at the
    # oldest, registered by the client's background thread.
    assert storage._tc_client.wait_for_stores(5000)
    assert sidecar.stats()["total"]["views"] == 1
    for c in conns:
        c.close()
    # With no view open, the process keeps its remote view for
    # VIEW_LINGER (1 s: a connection opened at every request would
    # otherwise release and register it each time), then releases it.
    deadline = time.time() + 20
    while sidecar.stats()["total"]["views"] != 0:
        assert time.time() < deadline, "the process's view was never released"
        time.sleep(0.05)
    db.close()


def test_a_dead_sidecar_degrades_to_misses_and_a_restarted_one_is_used_again(tmp_path, sidecar):
    storage, db = make_db(tmp_path, sidecar.socket)
    with db.transaction() as c:
        c.root()["doc"] = PersistentMapping(x=1)
    assert read_fresh(db) == 1
    sidecar.kill()
    # Commits and reads go on, with correct data, while the sidecar is gone.
    for i in range(2, 5):
        with db.transaction() as c:
            c.root()["doc"]["x"] = i
        assert read_fresh(db) == i
    assert storage.cache_stats()["unavailable"] > 0
    sidecar.start()
    deadline = time.time() + 10
    while True:
        with db.transaction() as c:
            c.root()["doc"]["x"] += 1
        value = read_fresh(db)
        hits = storage.cache_stats(wait=True)["hits"]
        assert value == read_fresh(db)
        s = storage.cache_stats(wait=True)
        if s["hits"] > hits and s["sidecar"] is not None:
            break
        assert time.time() < deadline, "never served from the restarted sidecar: %s" % s
        time.sleep(0.05)
    assert read_fresh(db) == value
    db.close()


def test_an_absent_sidecar_costs_misses_only(tmp_path):
    storage, db = make_db(tmp_path, str(tmp_path / "nobody.sock"))
    with db.transaction() as c:
        c.root()["doc"] = PersistentMapping(x=1)
    for _ in range(20):
        assert read_fresh(db) == 1
    s = storage.cache_stats()
    assert s["hits"] == 0 and s["sidecar"] is None
    assert s["misses"] > 0 and s["unavailable"] > 0
    db.close()


def history_past_a_backup(tmp_path, socket):
    """Data.fs with "backed up", copied to backup.fs, then changed to "after
    the backup" through tidecache (which now caches that state): returns the
    open ``(storage, db)``."""
    import shutil

    storage, db = make_db(tmp_path, socket)
    with db.transaction() as c:
        c.root()["doc"] = PersistentMapping(x="backed up")
    db.close()
    shutil.copy(tmp_path / "Data.fs", tmp_path / "backup.fs")
    storage, db = make_db(tmp_path, socket)
    with db.transaction() as c:
        c.root()["doc"]["x"] = "after the backup"
    assert read_fresh(db) == "after the backup"
    assert read_fresh(db) == "after the backup"
    return storage, db


def test_a_restored_backup_flushes_the_database_and_a_lagging_client_joins(tmp_path, sidecar, monkeypatch):
    import shutil

    import tidecache.storage

    monkeypatch.setattr(tidecache.storage, "RESTORE_GRACE_SECONDS", 0.2)
    storage, db = history_past_a_backup(tmp_path, sidecar.socket)
    assert storage.cache_stats(wait=True)["sidecar"]["entries"] > 0
    db.close()
    # Restore the backup over Data.fs: its lastTransaction is older than
    # what the sidecar knows.
    shutil.copy(tmp_path / "backup.fs", tmp_path / "Data.fs")
    for suffix in (".index", ".tmp", ".lock"):
        p = tmp_path / ("Data.fs" + suffix)
        if p.exists():
            p.unlink()
    storage, db = make_db(tmp_path, sidecar.socket)
    stats = storage.cache_stats(wait=True)["sidecar"]
    assert stats["horizon"] == u64(storage.lastTransaction())
    assert read_fresh(db) == "backed up"
    # A new commit (not touching doc) moves views past the old history's
    # tids: the old history's "after the backup" must not come back.
    with db.transaction() as c:
        c.root()["other"] = PersistentMapping(x=0)
    assert read_fresh(db) == "backed up"
    assert read_fresh(db) == "backed up"
    db.close()


def test_pack_flushes_the_database(tmp_path, sidecar):
    storage, db = make_db(tmp_path, sidecar.socket)
    with db.transaction() as c:
        c.root()["doc"] = PersistentMapping(x=1)
    read_fresh(db)
    read_fresh(db)
    assert storage.cache_stats(wait=True)["sidecar"]["entries"] > 0
    db.pack()
    assert storage.cache_stats(wait=True)["sidecar"]["entries"] == 0
    assert read_fresh(db) == 1
    db.close()


def test_zconfig_section_wraps_any_storage(tmp_path, sidecar):
    db = ZODB.config.databaseFromString(f"""
        %import tidecache
        <zodb>
          cache-size 0
          <tidecache>
            socket {sidecar.socket}
            timeout-ms 100
            <filestorage>
              path {tmp_path / "Data.fs"}
            </filestorage>
          </tidecache>
        </zodb>
    """)
    assert isinstance(db.storage, TideCacheStorage)
    assert db.storage._tc_client.database == "file:" + str(tmp_path / "Data.fs")
    with db.transaction() as c:
        c.root()["doc"] = PersistentMapping(x=7)
    assert read_fresh(db) == 7
    assert read_fresh(db) == 7
    assert db.storage.cache_stats()["hits"] >= 1
    db.close()


def test_databases_do_not_mix(tmp_path, sidecar):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sa, dba = make_db(tmp_path / "a", sidecar.socket)
    sb, dbb = make_db(tmp_path / "b", sidecar.socket)
    for db, v in ((dba, "a"), (dbb, "b")):
        with db.transaction() as c:
            c.root()["doc"] = PersistentMapping(x=v)
    for _ in range(3):
        assert read_fresh(dba) == "a"
        assert read_fresh(dbb) == "b"
    assert set(sidecar.stats()["databases"]) >= {sa._tc_client.database, sb._tc_client.database}
    dba.close()
    dbb.close()


def test_raw_client_follows_the_rules(sidecar):
    c = Client(sidecar.socket, database="raw")
    assert c.attach(10) == "started"
    assert c.store(1, 10, None, b"one", 10)
    assert c.store(2, 5, 8, b"two", 10)
    assert c.lookup(1, 10) == (10, b"one")
    assert c.lookup(1, 11) is None, "open revision past the horizon"
    assert c.lookup_many([1, 2, 3], 7) == [None, (5, b"two"), None]
    assert c.report(10, 12, [(1, 12)]) is None, "queued: returns at once"
    assert c.wait_for_stores(5000) and c.horizon == 12
    assert c.lookup(1, 11) == (10, b"one")
    assert c.lookup(1, 12) is None
    with pytest.raises(tidecache.GapError):
        c.report_now(13, 14, [])
    # Queued, a gap is answered by a resync at its end (no exception).
    c.report(13, 14, [])
    assert c.wait_for_stores(5000) and c.horizon == 14 and c.outbox_counts == (1, 0)
    with pytest.raises(tidecache.RefusedError):
        c.store(1, 9, 9, b"x", 10)
    stats = c.stats()["databases"]["raw"]
    assert (stats["horizon"], stats["entries"]) == (14, 2)
    c.close()
    with pytest.raises(tidecache.Unavailable):
        c.lookup(1, 10)


def test_mvcc_storages_are_refused_with_a_clear_error(sidecar):
    import zope.interface
    from ZODB.interfaces import IMVCCStorage

    base = ZODB.MappingStorage.MappingStorage()
    zope.interface.alsoProvides(base, IMVCCStorage)
    with pytest.raises(TypeError, match="IMVCCStorage"):
        TideCacheStorage(base, socket=sidecar.socket)


def test_database_keys(tmp_path):
    from tidecache import database_key

    fs = ZODB.FileStorage.FileStorage(str(tmp_path / "Data.fs"))
    assert database_key(fs) == "file:" + str(tmp_path / "Data.fs")
    fs.close()
    m = ZODB.MappingStorage.MappingStorage()
    assert database_key(m).startswith("MappingStorage:")
    assert str(os.getpid()) in database_key(m)
    assert database_key(m) != database_key(ZODB.MappingStorage.MappingStorage())


def history_tids(base):
    """Every transaction's tid in ``base``, oldest first, and every oid."""
    tids, oids = [], set()
    it = base.iterator()
    try:
        for txn in it:
            tids.append(u64(txn.tid))
            oids.update(u64(r.oid) for r in txn)
    finally:
        getattr(it, "close", lambda: None)()
    return tids, sorted(oids)


def assert_hits_match_load_before(storage):
    """Invariant 1 for every oid of the storage at every view its history
    can give a connection: a hit is what ``loadBefore(oid, view + 1)``
    returns."""
    base = storage._storage
    tids, oids = history_tids(base)
    client = storage._tc_client
    checked = 0
    for view in tids:
        for oid in oids:
            try:
                hit = client.lookup(oid, view)
            except tidecache.TideCacheError:
                hit = None
            if hit is None:
                continue
            r = base.loadBefore(p64(oid), p64(view + 1))
            assert r is not None, "hit for oid %d at %d where loadBefore has nothing" % (oid, view)
            assert (hit[0], hit[1]) == (u64(r[1]), r[0]), "oid %d at view %d" % (oid, view)
            checked += 1
    return checked


def restore_file(tmp_path, backup):
    import shutil

    shutil.copy(backup, tmp_path / "Data.fs")
    for suffix in (".index", ".tmp", ".lock"):
        p = tmp_path / ("Data.fs" + suffix)
        if p.exists():
            p.unlink()


def commit_without_tidecache(tmp_path, key="other", value=0):
    plain = ZODB.DB(ZODB.FileStorage.FileStorage(str(tmp_path / "Data.fs")))
    with plain.transaction() as c:
        c.root()[key] = PersistentMapping(x=value)
    plain.close()


def test_a_restored_backup_with_a_newer_commit_is_not_served_the_old_history(tmp_path, sidecar):
    """Invariant 7: a backup restored over Data.fs, then one commit made
    without tidecache (its tid is past the sidecar's horizon): the adapter
    must not join the old history, whose "after the backup" state the
    sidecar holds open."""
    storage, db = history_past_a_backup(tmp_path, sidecar.socket)
    assert storage.cache_stats()["hits"] >= 1
    db.close()
    restore_file(tmp_path, tmp_path / "backup.fs")
    commit_without_tidecache(tmp_path)
    storage, db = make_db(tmp_path, sidecar.socket)
    wait_horizon(storage)
    assert read_fresh(db) == "backed up"
    assert read_fresh(db) == "backed up"
    assert_hits_match_load_before(storage)
    assert storage.cache_stats()["flushes"] == 1
    db.close()


def wait_horizon(storage):
    """Waits (bounded) until the sidecar's horizon for this database is the
    storage's lastTransaction (a catch-up runs in the background)."""
    last = u64(storage.lastTransaction())
    deadline = time.time() + 10
    while True:
        s = storage._tc_client.stats()["databases"].get(storage._tc_client.database) or {}
        if s.get("horizon") == last:
            return
        assert time.time() < deadline, "the sidecar's horizon never reached %d: %s" % (last, s)
        time.sleep(0.02)


def test_another_file_copied_to_the_same_path_is_not_served_the_old_history(tmp_path, sidecar):
    """Invariant 7: a copy of another database (production copied over
    staging) at the same path, newer than the sidecar's horizon: same key,
    newer tid, another history. The proof fails and the database is
    flushed."""
    (tmp_path / "staging").mkdir()
    (tmp_path / "production").mkdir()
    production = ZODB.DB(ZODB.FileStorage.FileStorage(str(tmp_path / "production" / "Data.fs")))
    with production.transaction() as c:
        c.root()["doc"] = PersistentMapping(x="production")
    storage, db = make_db(tmp_path / "staging", sidecar.socket)
    with db.transaction() as c:
        c.root()["doc"] = PersistentMapping(x="staging")
    assert read_fresh(db) == "staging"
    assert read_fresh(db) == "staging"
    db.close()
    # Production commits once more (its last tid is past the sidecar's
    # horizon), then is copied over staging.
    with production.transaction() as c:
        c.root()["other"] = PersistentMapping(x=0)
    production.close()
    restore_file(tmp_path / "staging", tmp_path / "production" / "Data.fs")
    storage, db = make_db(tmp_path / "staging", sidecar.socket)
    wait_horizon(storage)
    assert read_fresh(db) == "production"
    assert read_fresh(db) == "production"
    assert_hits_match_load_before(storage)
    assert storage.cache_stats()["flushes"] == 1
    db.close()


def test_a_process_that_could_not_attach_joins_later_with_a_proof(tmp_path, sidecar):
    """A storage opened while the sidecar is down is not joined: it
    reports, stores and looks up nothing (a reconnect must not join it
    without a proof), and attaches again, with a proof, from a connection's
    poll once the sidecar is back."""
    import tidecache.storage

    first, db1 = make_db(tmp_path, sidecar.socket)
    with db1.transaction() as c:
        c.root()["doc"] = PersistentMapping(x=1)
    assert read_fresh(db1) == 1
    assert read_fresh(db1) == 1
    db1.close()
    sidecar.kill()
    second, db2 = make_db(tmp_path, sidecar.socket)
    assert not second.cache_stats()["joined"]
    # Restarted on its file: the horizon is the first storage's, which this
    # storage's history holds; this storage commits past it meanwhile.
    sidecar.start()
    with db2.transaction() as c:
        c.root()["doc"]["x"] = 2
    deadline = time.time() + 10
    while not second.cache_stats()["joined"]:
        assert time.time() < deadline, "never joined: %s" % second.cache_stats()
        assert read_fresh(db2) == 2
        tidecache.storage.time.sleep(0.05)
    wait_horizon(second)
    assert second.cache_stats()["proofs"] >= 1
    assert second.cache_stats()["flushes"] == 0
    # Served from the sidecar now (a busy machine may time a call out:
    # bounded polling for the first hit).
    deadline = time.time() + 10
    while second.cache_stats()["hits"] == 0:
        assert time.time() < deadline, "never served: %s" % second.cache_stats()
        assert read_fresh(db2) == 2
    assert_hits_match_load_before(second)
    db2.close()


def test_the_attach_retry_runs_off_the_application_thread(tmp_path, sidecar, monkeypatch):
    """A storage that could not join attaches again from a connection's
    poll: the attach (socket calls, the proof's loads) runs in a daemon
    thread, one at a time, and the poll returns at once (here: the
    attach is held until the connection has read from the base storage;
    on the application thread the poll would wait for it). ``close``
    joins the thread."""
    import threading

    import tidecache.storage

    monkeypatch.setattr(tidecache.storage, "REJOIN_INTERVAL", 0.0)
    monkeypatch.setattr(tidecache.storage, "RETRY_UNAVAILABLE", 0.0)
    first, db1 = make_db(tmp_path, sidecar.socket)
    with db1.transaction() as c:
        c.root()["doc"] = PersistentMapping(x=1)
    db1.close()
    sidecar.kill()
    storage, db = make_db(tmp_path, sidecar.socket, timeout_ms=2000)
    assert not storage.cache_stats()["joined"]
    # ZODB.DB's own first connection started a retry (the sidecar was
    # down): let it end.
    if getattr(storage, "_tc_worker", None) is not None:
        storage._tc_worker.join(20)
    sidecar.start()
    entered, release, names = threading.Event(), threading.Event(), []
    original = TideCacheStorage._tc_attach

    def attach(self, *args):
        names.append(threading.current_thread().name)
        entered.set()
        assert release.wait(20), "the attach was never released"
        return original(self, *args)

    monkeypatch.setattr(TideCacheStorage, "_tc_attach", attach)
    conn = db.open()  # poll_invalidations starts the retry
    assert entered.wait(20)
    conn.cacheMinimize()
    assert conn.root()["doc"]["x"] == 1  # from the base storage meanwhile
    conn.close()
    other = db.open()  # no second retry while one runs
    other.close()
    assert names == ["tidecache-rejoin"], names
    release.set()
    # The held attempt may find the client still waiting to reconnect:
    # polls retry (bounded).
    deadline = time.time() + 20
    while not storage.cache_stats()["joined"]:
        assert time.time() < deadline, storage.cache_stats()
        time.sleep(0.02)
        db.open().close()
    assert set(names) == {"tidecache-rejoin"}, names
    db.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("tidecache-") and t.is_alive()]
