"""What a transaction boundary and a miss cost from Python, with tidecache
and without, side by side in one run.

- **boundary**: ``poll_invalidations()`` + ``afterCompletion()`` on one
  connection's storage instance (what ZODB calls at every transaction's
  start and end): a ``TideCacheInstance`` (its view kept in the process,
  the sidecar told of the process's oldest view by a background thread)
  against ZODB's own ``MVCCAdapterInstance``.
- **miss**: ``load()`` of an oid the sidecar does not hold, over a
  ``MappingStorage``: the arena miss, ``loadBefore`` of the base, and the
  store queued for the background thread; against the same ``load()`` on
  ``MVCCAdapterInstance`` (``loadBefore`` alone). Stores are flushed between
  rounds (not timed), so every timed miss queues one.

Median of ``ROUNDS`` rounds, microseconds per operation. Writes
``bench-results/boundaries.json``. Part of ``make bench``.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ZODB.MappingStorage
from persistent.mapping import PersistentMapping
from ZODB.mvccadapter import MVCCAdapter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "adapters" / "python" / "tests"))
from conftest import tidecached_binary, wait_for_socket  # noqa: E402

ROUNDS = 7
BOUNDARIES = 20_000
MISSES = 1_000
OBJECTS = ROUNDS * MISSES


def populate():
    """A MappingStorage with ``OBJECTS`` small objects; their oids."""
    base = ZODB.MappingStorage.MappingStorage()
    db = ZODB.DB(base)
    oids = []
    with db.transaction() as c:
        root = c.root()
        for i in range(OBJECTS):
            root[i] = PersistentMapping(x=i)
        c.savepoint()
        oids = [root[i]._p_oid for i in range(OBJECTS)]
    # The storage stays open for the adapters (the DB is not closed).
    return base, oids


def _no_op():
    pass


def boundaries(instance):
    # ZODB's Connection calls afterCompletion where the storage has one
    # (MVCCAdapterInstance has not).
    poll = instance.poll_invalidations
    after = getattr(instance, "afterCompletion", _no_op)
    per = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(BOUNDARIES):
            poll()
            after()
        per.append((time.perf_counter() - t0) / BOUNDARIES * 1e6)
    return statistics.median(per)


def misses(instance, oids, flush):
    instance.poll_invalidations()
    per = []
    for r in range(ROUNDS):
        batch = oids[r * MISSES:(r + 1) * MISSES]
        t0 = time.perf_counter()
        load = instance.load
        for oid in batch:
            load(oid)
        per.append((time.perf_counter() - t0) / MISSES * 1e6)
        flush()
    getattr(instance, "afterCompletion", _no_op)()
    return statistics.median(per)


def main():
    from tidecache import TideCacheStorage

    base, oids = populate()
    anchor = MVCCAdapter(base).new_instance()
    with tempfile.TemporaryDirectory(prefix="tidecache-bench-") as tmp:
        socket = os.path.join(tmp, "s.sock")
        with open(os.path.join(tmp, "tidecached.log"), "ab") as log:
            proc = subprocess.Popen([tidecached_binary(), "serve", "--socket", socket, "--cache-file",
                                     os.path.join(tmp, "cache.arena"), "--memory-mb", "256"], stderr=log)
            try:
                wait_for_socket(socket, proc, "tidecached")
                storage = TideCacheStorage(base, socket=socket, timeout_ms=1000)
                instance = storage.new_instance()
                client = storage._tc_client
                results = {
                    "boundary_us": {"tidecache": boundaries(instance), "mvccadapter": boundaries(anchor)},
                    "miss_us": {
                        "tidecache": misses(instance, oids, lambda: client.wait_for_stores(10000)),
                        "mvccadapter": misses(anchor, oids, lambda: None),
                    },
                }
                stats = storage.cache_stats()
                results["check"] = {"misses": stats["misses"], "stores": stats["stores"]}
                instance.release()
                storage.close()
            finally:
                proc.terminate()
                proc.wait()
    for k in ("boundary_us", "miss_us"):
        r = results[k]
        r["added_us"] = r["tidecache"] - r["mvccadapter"]
        print("%-12s tidecache %7.2f us  MVCCAdapter %7.2f us  added %6.2f us"
              % (k, r["tidecache"], r["mvccadapter"], r["added_us"]))
    out = ROOT / "bench-results" / "boundaries.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
