"""What an operator sees of the adapter (issue 11, "See whether it
works"): readable database keys, a ``cache_stats()`` that never waits for
the sidecar, and the log lines of a client that falls back to its storage
and is served again."""

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import ZODB
import ZODB.FileStorage
from persistent.mapping import PersistentMapping

import tidecache.storage
from tidecache import TideCacheStorage
from tidecache import database_key
from tidecache.storage import zeo_database_key

# -- database keys ----------------------------------------------------------------


def test_zeo_keys_are_readable():
    assert zeo_database_key("/run/zeo.sock", "1") == "zeo:/run/zeo.sock:1"
    assert zeo_database_key(["/run/zeo.sock"], "main") == "zeo:/run/zeo.sock:main"
    assert zeo_database_key(("db.example", 8100), "1") == "zeo:db.example:8100:1"
    assert zeo_database_key([("db.example", 8100)], "1") == "zeo:db.example:8100:1"
    assert zeo_database_key(8100, "1") == "zeo:127.0.0.1:8100:1"
    assert zeo_database_key([("db1", 8100), ("db2", 8101)], "1") == "zeo:db1:8100,db2:8101:1"
    assert zeo_database_key([("::1", 8100)], "1") == "zeo:[::1]:8100:1"
    assert zeo_database_key(["/run/a.sock", ("db2", 8100)], "1") == "zeo:/run/a.sock,db2:8100:1"


def test_a_relative_zeo_socket_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert zeo_database_key("zeo.sock", "1") == "zeo:%s:1" % (tmp_path / "zeo.sock")


def test_zeo_keys_of_different_databases_differ():
    """The separators ``:`` and ``,`` are escaped inside a part: the
    storage name is what follows the last ``:``, so a path with a ``:``
    and a storage name with one never give the same key."""
    assert zeo_database_key("/run/a:b", "1") == "zeo:/run/a%3Ab:1"
    assert zeo_database_key("/run/a", "b:1") == "zeo:/run/a:b%3A1"
    assert zeo_database_key("/run/a,b", "1") != zeo_database_key(["/run/a", "/run/b"], "1")
    assert zeo_database_key("/run/a%3Ab", "1") != zeo_database_key("/run/a:b", "1")


def test_the_key_of_a_zeo_client_storage(zeo_server):
    import ZEO.ClientStorage

    cs = ZEO.ClientStorage.ClientStorage(zeo_server.address, wait_timeout=30)
    try:
        key = database_key(cs)
    finally:
        cs.close()
    assert key == "zeo:%s:1" % zeo_server.address
    assert not set("[]()'\"") & set(key), key


def test_the_key_of_a_file_storage_is_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs = ZODB.FileStorage.FileStorage("Data.fs")
    try:
        assert database_key(fs) == "file:%s" % (tmp_path / "Data.fs")
    finally:
        fs.close()


def test_the_key_of_a_relstorage_is_readable(tmp_path):
    pytest.importorskip("relstorage")
    from relstorage.adapters.sqlite.adapter import Sqlite3Adapter
    from relstorage.options import Options
    from relstorage.storage import RelStorage

    from tidecache.relstorage import relstorage_database_key

    options = Options(keep_history=False, driver="sqlite3", cache_local_mb=0)
    data_dir = str(tmp_path / "rs")
    base = RelStorage(Sqlite3Adapter(data_dir=data_dir, pragmas={}, options=options), options=options)
    try:
        key = relstorage_database_key(base)
    finally:
        base.close()
    assert key == "relstorage:sqlite:%s" % data_dir


# -- cache_stats() never waits for the sidecar --------------------------------------


class RecordingClient:
    """Stands in for a storage's native client: records on which thread
    ``stats`` and ``wait_for_stores`` are called; ``stats`` waits (bounded)
    for ``release`` before asking the sidecar; everything else goes to the
    native client."""

    def __init__(self, inner):
        self._inner = inner
        self.lock = threading.Lock()
        self.calls = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.finished = 0
        self.release = threading.Event()
        self.release.set()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def wait_for_stores(self, *args):
        with self.lock:
            self.calls.append(("wait_for_stores", threading.current_thread()))
        return self._inner.wait_for_stores(*args)

    def stats(self):
        with self.lock:
            self.calls.append(("stats", threading.current_thread()))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            assert self.release.wait(30)
            return self._inner.stats()
        finally:
            with self.lock:
                self.in_flight -= 1
                self.finished += 1

    def on(self, thread):
        with self.lock:
            return [name for name, t in self.calls if t is thread]


def poll(condition, what, seconds=20.0):
    """Waits, bounded, for an observable condition (a process's state)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.01)


def open_db(tmp_path, socket):
    storage = TideCacheStorage(ZODB.FileStorage.FileStorage(str(tmp_path / "Data.fs")), socket=socket)
    recording = RecordingClient(storage._tc_client)
    storage._tc_client = recording  # before ZODB.DB: its instances take the storage's client
    db = ZODB.DB(storage, cache_size=0)
    with db.transaction() as c:
        c.root()["doc"] = PersistentMapping(x=1)
    return storage, recording, db


def read(db, key="doc"):
    conn = db.open()
    try:
        conn.cacheMinimize()
        return conn.root()[key]["x"]
    finally:
        conn.close()


def test_cache_stats_never_asks_a_stopped_sidecar_on_the_callers_thread(tmp_path, sidecar, monkeypatch):
    storage, recording, db = open_db(tmp_path, sidecar.socket)
    me = threading.current_thread()
    try:
        assert read(db) == 1
        storage.cache_stats()
        assert recording.on(me) == [], "cache_stats() asked the sidecar on the caller's thread"
        poll(lambda: storage.cache_stats()["sidecar_age_s"] is not None, "a first answer")
        answered = storage.cache_stats()
        assert answered["sidecar"]["entries"] >= 1
        monkeypatch.setattr(tidecache.storage, "SIDECAR_STATS_INTERVAL", 0.0)
        sidecar.proc.send_signal(signal.SIGSTOP)
        try:
            before = recording.finished
            ages = []
            for _ in range(20):
                s = storage.cache_stats()
                ages.append(s["sidecar_age_s"])
                # The last answer, however old: the stopped sidecar cannot
                # answer a refresh.
                assert s["sidecar"] == answered["sidecar"]
                assert s["hits"] >= 0 and s["database"] == storage._tc_client.database
            assert ages == sorted(ages)
            # Refreshes were tried, off this thread (each bounded by the
            # client's timeout, in the background).
            poll(lambda: recording.finished > before, "a refresh of the stopped sidecar to end")
        finally:
            sidecar.proc.send_signal(signal.SIGCONT)
        assert recording.on(me) == [], "cache_stats() asked the sidecar on the caller's thread"
        assert {name for name, _ in recording.calls} == {"stats"}
    finally:
        db.close()


def test_one_refresh_at_a_time_and_close_waits_for_it(tmp_path, sidecar, monkeypatch):
    storage, recording, db = open_db(tmp_path, sidecar.socket)
    monkeypatch.setattr(tidecache.storage, "SIDECAR_STATS_INTERVAL", 0.0)
    recording.release.clear()  # the first refresh's stats() waits
    try:
        callers = [threading.Thread(target=lambda: [storage.cache_stats() for _ in range(50)])
                   for _ in range(4)]
        for t in callers:
            t.start()
        for t in callers:
            t.join(30)
        poll(lambda: recording.in_flight >= 1, "the refresh to start")
        assert len(recording.calls) == 1 and recording.most_in_flight == 1
        assert storage.cache_stats()["sidecar"] is None  # no answer yet
        recording.release.set()
        poll(lambda: storage.cache_stats()["sidecar"] is not None, "the refresh's answer")
        assert recording.most_in_flight == 1
    finally:
        recording.release.set()
        db.close()
    counters = storage.__dict__["_tc_sidecar_counters"]
    assert counters._thread is not None and not counters._thread.is_alive()
    assert recording.in_flight == 0


EXITING = r"""
import sys, ZODB, ZODB.FileStorage
from tidecache import TideCacheStorage
storage = TideCacheStorage(ZODB.FileStorage.FileStorage(sys.argv[1]), socket=sys.argv[2])
storage.cache_stats()  # starts a refresh, which may answer while the interpreter finalizes
print("exiting", flush=True)
"""


def test_a_process_exiting_during_a_refresh_exits_cleanly(tmp_path, sidecar):
    """Processes that exit (without closing their storage) right after
    ``cache_stats()`` started a refresh: the refresh is joined at exit. A
    daemon thread that comes back from the native client while the
    interpreter finalizes aborts it ("FATAL: exception not rethrown",
    status -6; seen in 4 of 6 such exits without the join)."""
    for i in range(6):
        out = subprocess.run([sys.executable, "-c", EXITING, str(tmp_path / ("Data%d.fs" % i)), sidecar.socket],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "exiting"


def test_cache_stats_wait_asks_the_sidecar_now(tmp_path, sidecar):
    storage, recording, db = open_db(tmp_path, sidecar.socket)
    try:
        assert read(db) == 1
        s = storage.cache_stats(wait=True)
        assert s["sidecar"]["entries"] >= 1 and s["sidecar_age_s"] is not None
        assert recording.on(threading.current_thread()) == ["wait_for_stores", "stats"]
    finally:
        db.close()


# -- a client falling back logs once, and once when served again ---------------


class FakeClient:
    database = "file:/x/Data.fs"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now


def fallback_records(caplog):
    return [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "tidecache" and ("fall back" in r.getMessage() or "served by" in r.getMessage())]


def test_fallback_warnings_are_rate_limited(caplog, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(tidecache.storage.time, "monotonic", clock.monotonic)
    caplog.set_level(logging.INFO, logger="tidecache")
    stats = tidecache.storage._Stats()
    client = FakeClient()
    for _ in range(100):
        stats.fell_back(client, "not connected")
    assert stats.unavailable == 100 and stats.falling_back
    clock.now += 2.5
    stats.served(client)
    stats.served(client)
    assert fallback_records(caplog) == [
        ("WARNING", "tidecache: file:/x/Data.fs: lookups fall back to the base storage (not connected); "
                    "the application goes on uncached until the sidecar serves it again"),
        ("INFO", "tidecache: file:/x/Data.fs: served by the sidecar again after 2.5 s "
                 "(100 lookups fell back to the base storage meanwhile)"),
    ]
    caplog.clear()
    # Within the minute: two more runs, neither logged.
    for _ in range(2):
        clock.now += 10
        stats.fell_back(client, "not connected")
        clock.now += 1
        stats.served(client)
    assert fallback_records(caplog) == []
    # A run that outlasts the minute is warned about once it has.
    clock.now += 10
    stats.fell_back(client, "timed out")
    assert fallback_records(caplog) == []
    clock.now += 30
    stats.fell_back(client, "timed out")
    stats.fell_back(client, "timed out")
    assert fallback_records(caplog) == [
        ("WARNING", "tidecache: file:/x/Data.fs: lookups fall back to the base storage (timed out); "
                    "the application goes on uncached until the sidecar serves it again "
                    "(2 more fallbacks since the previous warning, not logged)"),
    ]
    stats.served(client)
    assert fallback_records(caplog)[-1] == (
        "INFO", "tidecache: file:/x/Data.fs: served by the sidecar again after 30.0 s "
                "(3 lookups fell back to the base storage meanwhile)")


def commit_and_read(db, value):
    with db.transaction() as c:
        c.root()["doc"]["x"] = value
    assert read(db) == value


def test_a_killed_and_restarted_sidecar_logs_one_warning_and_one_info(tmp_path, sidecar, caplog):
    caplog.set_level(logging.INFO, logger="tidecache")
    storage, recording, db = open_db(tmp_path, sidecar.socket)
    value = [1]

    def step():
        value[0] += 1
        commit_and_read(db, value[0])

    def until(what, condition):
        deadline = time.monotonic() + 20
        while not condition():
            assert time.monotonic() < deadline, "timed out waiting for " + what
            step()
            time.sleep(0.01)

    try:
        assert read(db) == 1
        caplog.clear()
        sidecar.kill()
        until("the fallback warning", lambda: any(level == "WARNING" for level, _ in fallback_records(caplog)))
        assert storage.cache_stats()["falling_back"]
        for _ in range(20):
            step()  # falls back again: not logged again
        sidecar.start()
        until("the served-again line", lambda: any(level == "INFO" for level, _ in fallback_records(caplog)))
        records = fallback_records(caplog)
        assert [level for level, _ in records] == ["WARNING", "INFO"], records
        assert storage._tc_client.database in records[0][1]
        assert "lookups fall back to the base storage" in records[0][1]
        assert "served by the sidecar again after" in records[1][1]
        assert not storage.cache_stats()["falling_back"]
    finally:
        db.close()


def test_an_absent_sidecar_at_start_is_warned_about_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tidecache")
    storage, recording, db = open_db(tmp_path, str(tmp_path / "nobody.sock"))
    try:
        for _ in range(5):
            assert read(db) == 1
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "sidecar unavailable" in warnings[0], warnings
        assert storage.cache_stats()["falling_back"]
    finally:
        db.close()
    assert os.path.basename(storage._tc_socket) == "nobody.sock"
