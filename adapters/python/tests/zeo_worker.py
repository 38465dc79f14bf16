"""A worker process of test_zeo_processes: a ZODB application over ZEO
with TideCacheStorage. Prints one JSON document on stdout.

    zeo_worker.py writer ZEO_SOCKET SIDECAR_SOCKET COMMITS
    zeo_worker.py reader ZEO_SOCKET SIDECAR_SOCKET SECONDS
"""

import json
import random
import sys
import time

import transaction
import ZODB
from ZEO.ClientStorage import ClientStorage
from ZODB.utils import u64

from tidecache import TideCacheStorage


def open_db(zeo, sidecar):
    storage = TideCacheStorage(ClientStorage(zeo, wait_timeout=30), socket=sidecar, database="zeo-test")
    return storage, ZODB.DB(storage, cache_size=0)


def writer(zeo, sidecar, commits):
    storage, db = open_db(zeo, sidecar)
    history = []
    for i in range(1, commits + 1):
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        root = conn.root()
        root["a"]["v"] = i
        root["b"]["v"] = i
        tm.commit()
        history.append([u64(conn._storage._ltid), i])  # set by tpc_finish
        conn.close()
        time.sleep(random.random() * 0.004)
    out = {"history": history, "stats": storage.cache_stats()}
    db.close()
    return out


def reader(zeo, sidecar, seconds):
    storage, db = open_db(zeo, sidecar)
    seen = []
    deadline = time.time() + seconds
    while time.time() < deadline:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        conn.cacheMinimize()
        view = u64(conn._storage._start) - 1
        root = conn.root()
        seen.append([view, root["a"]["v"], root["b"]["v"]])
        tm.abort()
        conn.close()
    out = {"seen": seen, "stats": storage.cache_stats()}
    db.close()
    return out


if __name__ == "__main__":
    role, zeo, sidecar, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    result = writer(zeo, sidecar, int(n)) if role == "writer" else reader(zeo, sidecar, float(n))
    json.dump(result, sys.stdout)
