"""A sidecar killed with ``kill -9`` and restarted on the same arena file:
the first adapter to attach fills the sidecar's horizon in from its
storage's transaction iterator, in the background, so current revisions
answer again and those changed meanwhile never do."""

import logging
import time

import ZODB
import ZODB.FileStorage
from persistent.mapping import PersistentMapping
from ZODB.utils import u64

from test_storage import make_db, read_fresh

KEYS = "abcdef"


def populate_and_cache(tmp_path, sidecar):
    storage, db = make_db(tmp_path, sidecar.socket)
    with db.transaction() as c:
        for k in KEYS:
            c.root()[k] = PersistentMapping(x=0)
    for k in KEYS:
        assert read_fresh(db, k) == 0
    assert storage.cache_stats()["sidecar"]["entries"] >= len(KEYS)
    db.close()


def commit_behind_the_sidecars_back(tmp_path):
    plain = ZODB.DB(ZODB.FileStorage.FileStorage(str(tmp_path / "Data.fs")))
    for k in "bd":
        with plain.transaction() as c:
            c.root()[k]["x"] = 1
    plain.close()


def wait_caught_up(storage):
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
    storage, db = make_db(tmp_path, sidecar.socket)
    wait_caught_up(storage)
    assert "caught the sidecar up" in caplog.text
    hits = storage.cache_stats()["hits"]
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

    def no_iterator(self, start=None, stop=None):
        raise NotImplementedError("this storage cannot iterate")

    monkeypatch.setattr(ZODB.FileStorage.FileStorage, "iterator", no_iterator)
    caplog.set_level(logging.INFO, logger="tidecache")
    storage, db = make_db(tmp_path, sidecar.socket)
    wait_caught_up(storage)
    assert "cannot catch the sidecar up" in caplog.text
    assert storage.cache_stats()["resyncs"] == 1
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

    storage, db = make_db(tmp_path, sidecar.socket)
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
    storage, db = make_db(tmp_path, sidecar.socket)
    wait_caught_up(storage)
    assert storage.cache_stats()["flushes"] == 0, "joined by a proof, not flushed"
    # At the vanished transaction's tid the storage has no revision of x:
    # neither may the sidecar.
    assert storage._storage.loadBefore(x_oid, p64(tids[0] + 1)) is None
    assert storage._tc_client.lookup(u64(x_oid), tids[0]) is None
    assert "cannot catch the sidecar up" in caplog.text
    assert read_fresh(db, "x") == 2
    db.close()
