"""RelStorage 4.3's own test suites over SQLite, with every storage wrapped
in tidecache and a real ``tidecached`` (relstorage_suite.py), in a
subprocess: history-free and history-preserving, the ZODB conformance
tests RelStorage runs, its own, pack/undo, zodbconvert, blobs. The tests
that cannot run through a wrapper, the adapter's reported bugs and the
environment's baseline failures are skipped with their reasons
(relstorage_suite.py, docs/relstorage.md).

``test_a_failing_wrapper_is_seen`` runs a few of the suites' tests with a
fault injected into the wrapper's ``load``: the run must fail, so a green
``test_relstorage_suites_over_sqlite`` means the wrapped storages really
served the suites."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import tidecached_binary

HERE = pathlib.Path(__file__).resolve().parent
SUITE = HERE / "relstorage_suite.py"


def _run(*args, timeout=900):
    env = dict(os.environ, TIDECACHED=tidecached_binary())
    proc = subprocess.run([sys.executable, str(SUITE)] + list(args), env=env, cwd=str(HERE),
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    m = re.search(r"^RELSTORAGE-SUITE: .*$", out, re.M)
    assert m, "relstorage_suite.py printed no summary (exit %d):\n%s" % (proc.returncode, out[-6000:])
    summary = dict(re.findall(r"(\S+?)=(\d+)", m.group(0)))
    return proc.returncode, {k: int(v) for k, v in summary.items()}, m.group(0), out


def _failures(out):
    return "\n".join(re.findall(r"^(?:Failure|Error) in test .*$", out, re.M))


def test_relstorage_suites_over_sqlite():
    code, s, line, out = _run("--backend", "sqlite", "--", "-vv")
    print(line)
    assert code == 0 and s["failures"] == 0 and s["errors"] == 0, (
        "RelStorage's suites failed through tidecache: %s\n%s\n\n%s"
        % (line, _failures(out), out[-20000:]))
    # Both histories and the blob layers ran, through the wrapper...
    assert s["tests"] >= 300, line
    for layer in ("HistoryFreeRelStorageTests", "HistoryPreservingRelStorageTests",
                  "UnsharedHistoryFree", "SharedHistoryPreserving", "ZodbConvertTests"):
        assert layer in out, "no %s in the run" % layer
    assert "TideCacheRelStorage" in line, line
    assert s["wrapped-storages"] >= 200, line
    # ...and the sidecar served loads.
    assert s["sidecar-hits"] > 0, line


def test_a_failing_wrapper_is_seen():
    code, s, line, out = _run("--backend", "sqlite", "--fault", "load", "--",
                              "-t", r"RelStorageTests_sqlite3\.checkCrossConnectionIsolation\b",
                              "-t", r"UnsharedHistoryFreeTestConnectionBlob\.testGettingStuffOut\b")
    print(line)
    assert code != 0, "a wrapper whose load raises passed RelStorage's suites:\n" + out[-6000:]
    assert s["failures"] + s["errors"] > 0, line
    assert "fault injected into load" in out


def test_delete_object_is_not_served(sidecar, tmp_path):
    """RelStorage's checkImplementsIExternalGC, made deterministic: an
    object loaded (so stored in the sidecar), then deleted with
    ``deleteObject`` (IExternalGC, history-free) in a commit of the same
    instance, raises POSKeyError on that instance's next load without
    tidecache; through it, the state at the instance's view is served
    (the view, RelStorage's ``_cache.highest_visible_tid``, does not move
    for a commit that leaves no row)."""
    import ZODB
    from relstorage.adapters.sqlite.adapter import Sqlite3Adapter
    from relstorage.options import Options
    from relstorage.storage import RelStorage
    from ZODB.Connection import TransactionMetaData
    from ZODB.POSException import POSKeyError
    from ZODB.utils import z64

    import tidecache

    options = Options(keep_history=False, driver="sqlite3")
    base = RelStorage(Sqlite3Adapter(data_dir=str(tmp_path / "db"), pragmas={}, options=options),
                      options=options)
    db = ZODB.DB(tidecache.TideCacheStorage(base, socket=sidecar.socket))
    try:
        conn = db.open()
        storage = conn._storage
        _state, tid = storage.load(z64)
        assert db.storage.cache_stats(wait=True)["stores"] >= 1  # waits for the store
        t = TransactionMetaData()
        storage.tpc_begin(t)
        assert storage.deleteObject(z64, tid, t) == 1
        storage.tpc_vote(t)
        storage.tpc_finish(t)
        with pytest.raises(POSKeyError):  # fails: the deleted state is served
            storage.load(z64)
        conn.close()
    finally:
        db.close()
