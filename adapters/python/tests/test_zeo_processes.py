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
